"""The doctor's checks that ask a server over HTTP: the model server, Slack and Discord.

Each proves what a job will need, not only that something answers: the model server serves the
model ``CODELOOP_MODEL`` names (vLLM and OpenAI-compatible gateways answer 404 to any other), and
the platforms accept the tokens (Slack ``auth.test`` plus the scopes the app needs, Discord
``GET /users/@me`` plus whether ``/code`` is registered). A rejected token is a failing check.
Tokens go only in Authorization headers, never into a printed line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bot import __version__
from bot.core.settings import Settings

#: the bot scopes deploy/slack-manifest.yml grants; each one is used (tests keep the two in step)
SLACK_SCOPES = frozenset({"app_mentions:read", "chat:write", "reactions:write", "files:read", "files:write",
                          "channels:history", "groups:history", "im:history", "commands", "users:read"})
#: Slack's answers for a token that is not (or no longer) valid
SLACK_REJECTED = frozenset({"invalid_auth", "not_authed", "token_revoked", "token_expired", "account_inactive",
                            "not_allowed_token_type", "missing_scope"})


class Problem(Exception):
    """A failed check: ``str`` is what is wrong, ``fix`` what to do about it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}. Fix: {fix}")


class Advice(Exception):
    """Works, but a team should know (e.g. Redis without persistence): a warning, not a failure."""


def redact(url: str) -> str:
    """``url`` without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Reply:
    status: int
    body: Any = None  # parsed JSON, or None
    headers: dict[str, str] = field(default_factory=dict)


class Unreachable(Exception):
    """No HTTP answer at all (refused, DNS, timeout, TLS)."""


def fetch(url: str, headers: dict[str, str], timeout: float, data: bytes | None = None) -> Reply:
    """One request; any HTTP status is a Reply, no answer at all is ``Unreachable``."""
    request = urllib.request.Request(url, data=data, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Reply(resp.status, _json(resp.read()), {k.lower(): v for k, v in resp.headers.items()})
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, _json(exc.read()), {k.lower(): v for k, v in exc.headers.items()})
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(str(getattr(exc, "reason", exc))) from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


# --- the model server ---------------------------------------------------------------------------

def model_server(settings: Settings, timeout: float) -> str:
    return model_endpoint(settings, (settings.llm_url or "").rstrip("/"), settings.model, timeout)


def model_profile(settings: Settings, name: str, timeout: float) -> str:
    """A CODELOOP_MODEL_PROFILES endpoint, checked like the default server: it serves its model."""
    profile = settings.profiles[name]
    where = f"profile {name} in CODELOOP_MODEL_PROFILES"
    model_var = f"the name after '|' in {where}" if profile.model else f"CODELOOP_MODEL (or add '|name' to {where})"
    return model_endpoint(settings, profile.url, profile.model or settings.model, timeout, url_var=where,
                          model_var=model_var)


def model_endpoint(settings: Settings, url: str, wanted: str, timeout: float, *,
                   url_var: str = "CODELOOP_LLM_URL", model_var: str = "CODELOOP_MODEL") -> str:
    """The server at ``url`` answers and serves ``wanted``; the fixes name ``url_var`` and ``model_var``."""
    shown = redact(url)
    headers = {}
    if settings.llm_token is not None:
        headers["Authorization"] = f"Bearer {settings.llm_token.get_secret_value()}"
    assign = "=" if model_var == "CODELOOP_MODEL" else " to "

    def get(path: str) -> Reply:
        try:
            reply = fetch(url + path, headers, timeout)
        except Unreachable as exc:
            raise Problem(f"no model server answers at {shown} ({exc})",
                          f"start it (compose: --profile tgi) or set {url_var}") from None
        if reply.status in (401, 403):
            raise Problem(f"the model server at {shown} rejected us ({reply.status} on {path})",
                          "set CODELOOP_LLM_TOKEN to a token it accepts")
        if reply.status == 503:
            raise Problem(f"the model server at {shown} is up but not ready (503 on {path})",
                          "wait for it to load the weights (docker-compose logs tgi)")
        return reply

    health = get("/health")  # TGI, vLLM and llama.cpp's server answer it; gateways may not
    info = get("/info")
    if info.status == 200 and isinstance(info.body, dict) and info.body.get("model_id"):
        served = str(info.body["model_id"])
        if served != wanted:
            # TGI serves its one model whatever name a request carries: works, but says otherwise.
            raise Advice(f"TGI at {shown} serves {served} (it ignores the model name), but {model_var} "
                         f"is {wanted}: set {model_var}{assign}{served} so logs and metrics name "
                         "the model that answers")
        return f"TGI at {shown} serves {served}"
    models = get("/v1/models")
    if models.status == 200:
        try:
            names = [str(m["id"]) for m in models.body["data"]]
        except (KeyError, TypeError):
            names = []
        if wanted in names:
            return f"{shown} serves {wanted}"
        if names:
            raise Problem(f"the model server at {shown} does not serve {wanted!r} ({model_var}); it serves: "
                          + ", ".join(names), f"set {model_var} to one of those names, or load the model there")
    if health.status == 200:
        raise Advice(f"{shown} answers /health but lists no models (/info, /v1/models): cannot tell whether it "
                     f"serves {wanted}")
    raise Problem(f"{shown} is not a TGI or OpenAI-compatible server ({health.status} on /health, "
                  f"{models.status} on /v1/models)", f"point {url_var} at the server's base URL, without /v1")


# --- Slack --------------------------------------------------------------------------------------

def slack(settings: Settings, timeout: float) -> str:
    s = settings
    second = ("slack_app_token", "xapp-") if s.slack_mode == "socket" else ("slack_signing_secret", "")
    tokens: dict[str, str] = {}
    for name, prefix in dict([("slack_bot_token", "xoxb-"), second]).items():
        value = getattr(s, name)
        var = f"CODELOOP_{name.upper()}"
        if value is None or not value.get_secret_value():
            raise Problem(f"Slack ({s.slack_mode} mode) needs {var}",
                          "copy it from your Slack app's settings into .env (docs/SLACK.md)")
        if prefix and not value.get_secret_value().startswith(prefix):
            raise Problem(f"{var} does not start with {prefix}",
                          "use the bot token (OAuth & Permissions) for xoxb-, the app-level token "
                          "with connections:write (Basic Information) for xapp-")
        tokens[name] = value.get_secret_value()
    api = s.slack_api_url.rstrip("/") + "/"
    me = _slack_call(api, "auth.test", tokens["slack_bot_token"], "CODELOOP_SLACK_BOT_TOKEN", timeout,
                     "copy the Bot User OAuth Token (xoxb-…) from OAuth & Permissions; reinstall the app if "
                     "it was revoked")
    who = f"bot @{me.body.get('user')} ({me.body.get('user_id')}) in team {me.body.get('team')}"
    granted = me.headers.get("x-oauth-scopes")
    if granted is not None:
        missing = sorted(SLACK_SCOPES - {g.strip() for g in granted.split(",")})
        if missing:
            raise Problem(f"Slack {who}: the token lacks the scopes {', '.join(missing)}",
                          "add them under OAuth & Permissions (deploy/slack-manifest.yml lists every one) "
                          "and reinstall the app to the workspace")
    if s.slack_mode == "socket":
        _slack_call(api, "apps.connections.open", tokens["slack_app_token"], "CODELOOP_SLACK_APP_TOKEN", timeout,
                    "create an app-level token with connections:write under Basic Information, and turn "
                    "Socket Mode on")
        return f"{who}, scopes complete; app token opens Socket Mode"
    return f"{who}, scopes complete; HTTP mode (the signing secret is checked on each request)"


def _slack_call(api: str, method: str, token: str, var: str, timeout: float, fix: str) -> Reply:
    try:
        reply = fetch(api + method, {"Authorization": f"Bearer {token}",
                                     "Content-Type": "application/x-www-form-urlencoded"}, timeout, data=b"")
    except Unreachable as exc:
        raise Problem(f"Slack's Web API is not reachable at {api} ({exc})",
                      "allow outbound HTTPS to Slack, or correct CODELOOP_SLACK_API_URL") from None
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.status == 200 and body.get("ok") is True:
        return Reply(reply.status, body, reply.headers)
    error = body.get("error") or f"HTTP {reply.status}"
    if error in SLACK_REJECTED:
        raise Problem(f"Slack rejected {var} ({error} on {method})", fix)
    raise Problem(f"Slack answered {method} with {error}", "retry later; if it persists see Slack's status page")


# --- Discord ------------------------------------------------------------------------------------

def discord(settings: Settings, timeout: float) -> str:
    token = settings.discord_token
    if token is None or not token.get_secret_value():
        raise Problem("the Discord bot needs CODELOOP_DISCORD_TOKEN",
                      "copy the token from the Discord developer portal (Bot → Reset Token) into .env")
    if token.get_secret_value().count(".") != 2:
        raise Problem("CODELOOP_DISCORD_TOKEN does not look like a bot token (three dot-separated parts)",
                      "copy the Bot token, not the application id or the client secret")
    api = settings.discord_api_url.rstrip("/")
    # Discord asks bots to say who they are; urllib's default agent may be refused outright.
    headers = {"Authorization": f"Bot {token.get_secret_value()}",
               "User-Agent": f"DiscordBot (codeloop, {__version__})"}

    def get(path: str) -> Reply:
        try:
            reply = fetch(api + path, headers, timeout)
        except Unreachable as exc:
            raise Problem(f"Discord's API is not reachable at {api} ({exc})",
                          "allow outbound HTTPS to Discord, or correct CODELOOP_DISCORD_API_URL") from None
        if reply.status == 401:
            raise Problem(f"Discord rejected CODELOOP_DISCORD_TOKEN (401 on {path})",
                          "reset the token under Bot → Reset Token in the developer portal and put the new one in .env")
        if reply.status != 200 or not isinstance(reply.body, (dict, list)):
            raise Problem(f"Discord answered {path} with HTTP {reply.status}",
                          "retry later; if it persists see Discord's status page")
        return reply

    me = get("/users/@me").body
    who = f"bot {me.get('username')} ({me.get('id')})"
    app_id = get("/oauth2/applications/@me").body.get("id") or me.get("id")
    commands = [c.get("name") for c in get(f"/applications/{app_id}/commands").body if isinstance(c, dict)]
    if "code" not in commands:
        raise Advice(f"Discord {who}: /code is not registered as a global command (a server-only registration "
                     "from --sync --guild does not show here): run `codeloop discord --sync` once")
    return f"{who}, /code registered"
