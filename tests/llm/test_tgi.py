"""The TGI/OpenAI-compatible backend against a real HTTP server on loopback."""

from __future__ import annotations

import pytest

from bot.errors import ModelError, ModelOverloaded
from bot.llm.base import GenerationParams
from bot.llm.tgi import TGIClient
from tests.fakes.model_server import ScriptedModelServer

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


async def _collect(client: TGIClient, params: GenerationParams | None = None) -> list[str]:
    return [d async for d in client.stream_chat(MESSAGES, params or GenerationParams())]  # type: ignore[arg-type]


async def test_streams_deltas_and_sends_greedy_params() -> None:
    server = await ScriptedModelServer(script=["Hello there, general Kenobi."], chunk_chars=5).start()
    client = TGIClient(server.url, backoff_s=0.01)
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


@pytest.mark.parametrize("status", [429, 503])
async def test_overload_is_retried_then_succeeds(status: int) -> None:
    server = await ScriptedModelServer(script=["ok"], fail_times=2, fail_status=status).start()
    client = TGIClient(server.url, retries=3, backoff_s=0.01)
    try:
        assert "".join(await _collect(client)) == "ok"
    finally:
        await client.aclose()
        await server.stop()
    assert len(server.requests) == 3


async def test_persistent_overload_is_reported() -> None:
    server = await ScriptedModelServer(script=["never"], fail_times=100, fail_status=429).start()
    client = TGIClient(server.url, retries=2, backoff_s=0.01)
    try:
        with pytest.raises(ModelOverloaded) as err:
            await _collect(client)
    finally:
        await client.aclose()
        await server.stop()
    assert len(server.requests) == 3
    assert "overloaded" in err.value.user_message()


async def test_client_errors_are_not_retried() -> None:
    server = await ScriptedModelServer(script=["x"], fail_times=5, fail_status=422).start()
    client = TGIClient(server.url, retries=3, backoff_s=0.01)
    try:
        with pytest.raises(ModelError, match="422"):
            await _collect(client)
    finally:
        await client.aclose()
        await server.stop()
    assert len(server.requests) == 1


async def test_unreachable_server_is_overload_after_retries() -> None:
    client = TGIClient("http://127.0.0.1:9", retries=1, backoff_s=0.01)
    try:
        with pytest.raises(ModelOverloaded):
            await _collect(client)
    finally:
        await client.aclose()
