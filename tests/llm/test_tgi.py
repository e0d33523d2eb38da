"""The TGI/OpenAI-compatible backend against a real HTTP server on loopback."""

from __future__ import annotations

import socket

import pytest

from bot.core.errors import ModelError, ModelOverloaded
from bot.llm.base import GenerationParams
from bot.llm.tgi import TGIClient
from tests.fakes.model_server import ScriptedModelServer

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
MODEL = "m-a-p/OpenCodeInterpreter-DS-6.7B"


async def _collect(client: TGIClient, params: GenerationParams | None = None) -> list[str]:
    return [d async for d in client.stream_chat(MESSAGES, params or GenerationParams())]  # type: ignore[arg-type]


async def test_streams_deltas_and_sends_greedy_params() -> None:
    server = await ScriptedModelServer(script=["Hello there, general Kenobi."], chunk_chars=5).start()
    client = TGIClient(server.url, model=MODEL, backoff_s=0.01)
    try:
        deltas = await _collect(client, GenerationParams(max_new_tokens=77, stop=("<|EOT|>",)))
    finally:
        await client.aclose()
        await server.stop()
    assert "".join(deltas) == "Hello there, general Kenobi."
    assert len(deltas) > 3  # really streamed
    sent = server.requests[0]
    assert sent["stream"] is True and sent["max_tokens"] == 77 and sent["temperature"] == 0.0
    assert sent["stop"] == ["<|EOT|>"]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["model"] == MODEL


async def test_a_server_that_serves_models_by_name_gets_the_configured_name() -> None:
    """vLLM (and Ollama, LM Studio, gateways) answer 404 to any model name but the one they serve."""
    from bot.core.settings import Settings

    server = await ScriptedModelServer(script=["served"], served_model="ds-6.7b").start()
    right = TGIClient.from_settings(Settings.load(llm_url=server.url, model="ds-6.7b"))
    wrong = TGIClient.from_settings(Settings.load(llm_url=server.url, llm_backoff_s=0.01))  # the default name
    try:
        assert "".join(await _collect(right)) == "served"
        with pytest.raises(ModelError) as err:
            await _collect(wrong)
    finally:
        await right.aclose()
        await wrong.aclose()
        await server.stop()
    assert [r["model"] for r in server.requests] == ["ds-6.7b", "m-a-p/OpenCodeInterpreter-DS-1.3B"]
    assert "HTTP 404" in err.value.user_message() and "CODELOOP_MODEL" in str(err.value)
    assert len(server.requests) == 2  # a 404 is not retried


@pytest.mark.parametrize("status", [429, 503])
async def test_overload_is_retried_then_succeeds(status: int) -> None:
    server = await ScriptedModelServer(script=["ok"], fail_times=2, fail_status=status).start()
    client = TGIClient(server.url, model=MODEL, retries=3, backoff_s=0.01)
    try:
        assert "".join(await _collect(client)) == "ok"
    finally:
        await client.aclose()
        await server.stop()
    assert len(server.requests) == 3


async def _error_from(url: str, retries: int) -> ModelError:
    """The error a request to the model server at ``url`` ends in."""
    client = TGIClient(url, model=MODEL, retries=retries, backoff_s=0.01)
    try:
        with pytest.raises(ModelError) as err:
            await _collect(client)
    finally:
        await client.aclose()
    return err.value


async def _error_from_server(status: int, retries: int) -> tuple[ModelError, ScriptedModelServer]:
    """The error a request ends in when the server answers every request with ``status``."""
    server = await ScriptedModelServer(script=["never"], fail_times=100, fail_status=status).start()
    try:
        return await _error_from(server.url, retries), server
    finally:
        await server.stop()


async def test_persistent_overload_is_reported() -> None:
    error, server = await _error_from_server(429, retries=2)
    assert isinstance(error, ModelOverloaded)
    assert len(server.requests) == 3
    assert "overloaded" in error.user_message()


async def test_client_errors_are_not_retried() -> None:
    error, server = await _error_from_server(422, retries=3)
    assert type(error) is ModelError and "422" in str(error)
    assert len(server.requests) == 1


async def test_unreachable_server_is_overload_after_retries() -> None:
    assert isinstance(await _error_from("http://127.0.0.1:9", retries=1), ModelOverloaded)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _names_no_host(message: str, port: int) -> bool:
    return "127.0.0.1" not in message and str(port) not in message and "http" not in message


async def test_an_unreachable_server_is_not_named_to_the_user() -> None:
    port = _closed_port()
    error = await _error_from(f"http://127.0.0.1:{port}", retries=1)
    assert isinstance(error, ModelOverloaded)
    message = error.user_message()
    assert _names_no_host(message, port), message
    assert "not answering" in message
    assert f"127.0.0.1:{port}" in str(error)  # the detail, for the log, keeps the address


@pytest.mark.parametrize(("status", "kind"), [(422, ModelError), (500, ModelError), (503, ModelOverloaded)])
async def test_server_errors_are_told_to_the_user_without_the_server_url(status: int,
                                                                          kind: type[ModelError]) -> None:
    error, server = await _error_from_server(status, retries=1)
    assert type(error) is kind
    message = error.user_message()
    assert _names_no_host(message, server.port), message
    assert f"HTTP {status}" in message
    assert str(server.port) in str(error)


async def test_the_hosts_hugging_face_login_is_not_sent_to_the_model_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub falls back to HF_TOKEN for a URL model; that token is not the server's to see."""
    monkeypatch.setenv("HF_TOKEN", "hf_host_login_secret")
    server = await ScriptedModelServer(script=["ok"]).start()
    anonymous, keyed = TGIClient(server.url, model=MODEL), TGIClient(server.url, model=MODEL, token="server-key")
    try:
        assert "".join(await _collect(anonymous)) == "ok"
        assert "".join(await _collect(keyed)) == "ok"
    finally:
        await anonymous.aclose()
        await keyed.aclose()
        await server.stop()
    assert server.authorization == [None, "Bearer server-key"]


@pytest.mark.parametrize("report", [True, False])
async def test_each_generation_reports_its_tokens(report: bool) -> None:
    """The server's own counts from the stream's last chunk; a server that sends none: an estimate."""
    from bot.llm.base import TokenUsage

    server = await ScriptedModelServer(script=["Hello there, general Kenobi."], chunk_chars=5,
                                       report_usage=report).start()
    client = TGIClient(server.url, model=MODEL, backoff_s=0.01)
    usage = TokenUsage()
    try:
        text = "".join([d async for d in client.stream_chat(MESSAGES, GenerationParams(), usage)])  # type: ignore[arg-type]
    finally:
        await client.aclose()
        await server.stop()
    assert text == "Hello there, general Kenobi."
    assert server.requests[0]["stream_options"] == {"include_usage": True}
    if report:
        [sent] = server.usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.exact) == (
            sent["prompt_tokens"], sent["completion_tokens"], True)
        assert usage.completion_tokens == 6  # 28 characters in chunks of 5
    else:
        assert server.usage == []
        assert usage.prompt_tokens == client.count_tokens(MESSAGES)  # type: ignore[arg-type]
        assert (usage.completion_tokens, usage.exact) == (6, False)
