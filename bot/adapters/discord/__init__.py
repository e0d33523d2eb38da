"""The Discord adapter: ``/code`` starts a conversation in its own thread; messages there continue it.

    client.py   discord.py client: intents, the command, REST base URL, the reply-stream reader
    intake.py   interactions, mentions and thread messages -> Jobs (allowlists, limits, per-user slots)
    render.py   Events -> thread messages: streamed edits, outputs, files, the status message
    format.py   what those messages say, within Discord's limits (pure functions)
    views.py    the Stop and Re-run buttons (persistent across restarts)
    store.py    thread, job and active-job records in Redis
    cli.py      ``codeloop discord`` (run, ``--sync`` the command, ``--invite`` URL)

Setup for operators is in docs/DISCORD.md.
"""
