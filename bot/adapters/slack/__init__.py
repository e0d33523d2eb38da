"""The Slack adapter: bolt app (Socket Mode or HTTP Events API) → Jobs; Events → thread replies.

    inbound.py     Slack payloads → Jobs (pure rules: threads, DMs, allowlists, controls, files)
    app.py         the bolt app and its listeners (enqueue, then ack)
    transcript.py  Events folded into message text
    render.py      per-job actors that post, edit, upload and react
    cli.py         ``codeloop slack``
"""
