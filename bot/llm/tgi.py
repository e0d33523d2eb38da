"""TGI / OpenAI-compatible chat server backend (huggingface_hub ``AsyncInferenceClient``).

The server applies the model's own chat template. 429/503 and connection failures before the
first token are retried with exponential backoff; if they persist, ``ModelOverloaded`` carries
a message the user sees. A failure after tokens have streamed is not retried (the user already
saw part of the reply), it surfaces as ``ModelError``. The text chat users see never names the
server: its URL, and the client libraries' error text that repeats it, go to the log and to the
error's detail (``str(error)``) only; users get the status code at most.

Each request gets its own ``AsyncInferenceClient``, closed when its stream ends: the client
enters every streamed response into an exit stack that is only unwound by ``close()``, so one
long-lived client keeps every response it ever streamed (~20 MiB per 1,000 requests, measured
by benchmarks/overload_rss.py). They share one HTTP connection pool, because a new pool costs
~20 ms of TLS set-up per request; were the attribute that carries it ever renamed upstream,
each request would simply get a pool of its own: slower, still correct.

Every request names the model (``CODELOOP_MODEL``): TGI and llama.cpp's server ignore the field,
but vLLM, Ollama, LM Studio and OpenAI-compatible gateways serve models by name and answer 404
to any other (huggingface_hub would send a placeholder). ``codeloop doctor`` compares the name
with what the server lists.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient, get_async_session
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

from bot.core.errors import ModelError, ModelOverloaded
from bot.core.settings import Settings
from bot.llm.base import ChatMessage, GenerationParams, TokenUsage

log = logging.getLogger(__name__)

# Connection failures (server restarting) are retried like overload.
TRANSIENT = (HfHubHTTPError, InferenceTimeoutError, httpx2.TransportError, OSError)
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
# A remote server's tokenizer is not at hand; ~3 characters per token over-counts code slightly,
# which errs on the side of dropping an old turn rather than overflowing the context.
CHARS_PER_TOKEN = 3.0


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


async def _drop_authorization(request: httpx2.Request) -> None:
    request.headers.pop("authorization", None)


class TGIClient:
    def __init__(self, url: str, *, model: str, token: str | None = None, context_tokens: int = 16384,
                 timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.context_tokens = context_tokens
        self.retries = retries
        self.backoff_s = backoff_s
        self._token = token
        self._timeout_s = timeout_s
        self._http: Any = None  # the shared httpx pool, made on first use (it needs a running loop)

    @classmethod
    def from_settings(cls, settings: Settings) -> TGIClient:
        assert settings.llm_url is not None  # Settings.load() enforces it for this backend
        return cls(
            settings.llm_url,
            model=settings.model,
            token=settings.llm_token.get_secret_value() if settings.llm_token else None,
            context_tokens=settings.context_tokens,
            timeout_s=settings.llm_timeout_s,
            retries=settings.llm_retries,
            backoff_s=settings.llm_backoff_s,
        )

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return sum(int(len(m["content"]) / CHARS_PER_TOKEN) + 4 for m in messages)

    async def _open(self, messages: list[ChatMessage],
                    params: GenerationParams) -> tuple[AsyncInferenceClient, AsyncIterator[Any]]:
        # include_usage: the server's own token counts arrive in the stream's last chunk (TGI, vLLM,
        # llama.cpp's server); a server that ignores it gets this side's estimate instead
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens, "stream": True,
                                  "stream_options": {"include_usage": True}}
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs["temperature"] = 0.0  # greedy on TGI, vLLM and llama.cpp's server
        if params.stop:
            kwargs["stop"] = list(params.stop)
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            client = self._request_client()
            try:
                stream: AsyncIterator[Any] = await client.chat_completion([dict(m) for m in messages], **kwargs)
                return client, stream
            except BaseException as exc:
                await client.close()  # type: ignore[no-untyped-call]
                if not isinstance(exc, TRANSIENT):
                    raise
                status = _status(exc)
                if status is not None and status not in RETRYABLE_STATUS:
                    detail = f"model server {self.url} answered {status}: {str(exc)[:300]}"
                    if status == 404:
                        detail += (f" (does it serve the model {self.model!r}? `codeloop doctor --only model` "
                                   "lists what it serves; set CODELOOP_MODEL to one of them)")
                    log.error("%s", detail)
                    raise ModelError(detail, for_user=f"The model server turned the request down (HTTP {status}). "
                                     "Try again in a minute; if it keeps happening, tell the bot's operators."
                                     ) from exc
                last = exc
                if attempt < self.retries:
                    delay = self.backoff_s * (2**attempt) * (1 + random.random() / 2)
                    log.warning("model server busy (%s); retry %d/%d in %.2fs", status or exc.__class__.__name__,
                                attempt + 1, self.retries, delay)
                    await asyncio.sleep(delay)
        status = _status(last) if last else None
        attempts = self.retries + 1
        if status:
            detail = f"HTTP {status} from {self.url} after {attempts} attempts"
            for_user = (f"The model server is overloaded and did not recover after retries "
                        f"(HTTP {status} after {attempts} attempts). Try again shortly.")
        else:
            detail = f"no answer from {self.url} after {attempts} attempts ({last!r})"
            for_user = ("The model server is not answering and did not recover after retries. "
                        "Try again in a minute.")
        log.error("model server: %s", detail)
        raise ModelOverloaded(detail, for_user=for_user) from last

    def _request_client(self) -> AsyncInferenceClient:
        if self._http is None:
            self._http = get_async_session()
            if not self._token:
                # Without CODELOOP_LLM_TOKEN, huggingface_hub falls back to the host's Hugging Face login
                # (HF_TOKEN, or the token file, read on every request) and sends it to whatever server
                # llm_url names. That credential is not the model server's to see.
                self._http.event_hooks["request"].append(_drop_authorization)
        client = AsyncInferenceClient(base_url=self.url, token=self._token, timeout=self._timeout_s)
        client._async_client = self._http  # not entered in its exit stack, so close() leaves it open
        return client

    async def stream_chat(self, messages: list[ChatMessage], params: GenerationParams,
                          usage: TokenUsage | None = None) -> AsyncIterator[str]:
        client, stream = await self._open(messages, params)
        reported: Any = None
        chunks = 0
        try:
            async for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    reported = chunk.usage
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta.content
                if delta:
                    chunks += 1
                    yield delta
        except TRANSIENT as exc:
            detail = f"the stream from model server {self.url} broke off: {exc}"
            log.error("%s", detail)
            raise ModelError(detail, for_user="The model server stopped answering in the middle of the reply. "
                                              "Try again in a minute.") from exc
        finally:
            if usage is not None:
                self._fill_usage(usage, reported, messages, chunks)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            await client.close()  # type: ignore[no-untyped-call]

    def _fill_usage(self, usage: TokenUsage, reported: Any, messages: list[ChatMessage], chunks: int) -> None:
        """The server's counts when it sent them (sane ones only), else an estimate: the prompt as
        ``count_tokens`` sees it and one token per streamed chunk (what TGI and vLLM send)."""
        prompt: Any = getattr(reported, "prompt_tokens", None)
        completion: Any = getattr(reported, "completion_tokens", None)
        if all(type(n) is int and 0 <= n < 1 << 31 for n in (prompt, completion)):
            usage.prompt_tokens, usage.completion_tokens, usage.exact = prompt, completion, True
        else:
            usage.prompt_tokens, usage.completion_tokens, usage.exact = self.count_tokens(messages), chunks, False

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
