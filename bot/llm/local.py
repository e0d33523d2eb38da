"""The in-process model backend: a transformers causal LM on the worker's own device.

Every conversation of the worker shares one model and one scheduler thread (``Batcher``), which
decodes all running conversations in the same forward pass; this module is the asyncio face of
it. The prompt is the tokenizer's own chat template (the format the model was trained on),
tokens come back per conversation through its event loop, and are turned into text deltas here,
off the model's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from bot.core.errors import ConfigError, ModelError
from bot.llm.base import ChatMessage, GenerationParams, TokenUsage
from bot.llm.local_batcher import Batcher, BatchStats, Delivery, Request
from bot.llm.local_detok import IncrementalDecoder, StopFilter

if TYPE_CHECKING:
    import torch

    from bot.core.settings import Settings

__all__ = ["LocalModelClient", "load_model", "resolve_device", "resolve_dtype"]


def resolve_device(setting: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise ConfigError(f"CODELOOP_DEVICE: {setting!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"CODELOOP_DEVICE={setting} but torch sees no CUDA device (is this the CPU build?)")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it (fp16 on older ones), fp32 on the CPU."""
    import torch

    if setting != "auto":
        dtype: torch.dtype = getattr(torch, setting)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model and tokenizer from a Hub id (downloaded with a progress bar) or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        # SDPA dispatches to flash / memory-efficient kernels on CUDA and takes padding masks
        model: Any = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    except OSError as exc:
        raise ModelError(f"cannot load CODELOOP_MODEL={name!r}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"CODELOOP_MODEL={name!r} has no chat_template; use an instruction-tuned model")
    return model.to(device).eval(), tokenizer


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    return ids


class LocalModelClient:
    """``ModelClient`` over an in-process model, batching concurrent conversations."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        context_tokens: int,
        max_batch: int = 16,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        """``eos_token_ids``: tokens that end a reply; default the tokenizer's and the model's eos.

        The benchmark passes an empty set so every stream runs to its token budget.
        """
        self.context_tokens = context_tokens
        self._tok = tokenizer
        self._eos = frozenset(_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._eos), 0)
        self._batcher = Batcher(model, max_batch=max_batch, pad_id=int(pad))
        self._special = set(getattr(tokenizer, "all_special_tokens", ())) | set(
            getattr(tokenizer, "get_added_vocab", dict)().keys()
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalModelClient:
        device = resolve_device(settings.device)
        model, tokenizer = load_model(settings.model, device, resolve_dtype(settings.dtype, device))
        context = settings.context_tokens
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int):
            context = min(context, limit)  # past its trained length the model's output degrades
        return cls(model, tokenizer, context_tokens=context, max_batch=settings.max_batch)

    @property
    def stats(self) -> BatchStats:
        return self._batcher.stats

    def encode(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt's token ids, exactly as the model will see them."""
        ids = self._tok.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(i) for i in ids]

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self.encode(messages))

    def _split_stops(self, stops: Iterable[str]) -> tuple[frozenset[int], list[str]]:
        """Special tokens (e.g. ``<|EOT|>``) never appear in decoded text: stop on their id."""
        ids = set(self._eos)
        texts: list[str] = []
        for stop in stops:
            if stop in self._special:
                ids.add(int(self._tok.convert_tokens_to_ids(stop)))
            elif stop:
                texts.append(stop)
        return frozenset(ids), texts

    async def stream_chat(self, messages: list[ChatMessage], params: GenerationParams,
                          usage: TokenUsage | None = None) -> AsyncIterator[str]:
        # On the loop's thread, like decoding: a tokenizer shared across threads can fail with
        # "Already borrowed" (tokenizers' Rust core), and a prompt encodes in about a millisecond.
        prompt = self.encode(messages)
        room = self.context_tokens - len(prompt)
        if room <= 0:
            detail = f"the prompt has {len(prompt)} tokens; the context holds {self.context_tokens}"
            raise ModelError(detail, for_user=f"The conversation is too long for the model: {detail}. "
                                              "Say \"reset\" to start a fresh one.")
        stop_ids, stop_texts = self._split_stops(params.stop)
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        req = Request(
            prompt_ids=prompt,
            max_new_tokens=min(params.max_new_tokens, room),
            loop=asyncio.get_running_loop(),
            queue=queue,
            temperature=params.temperature,
            top_p=params.top_p,
            stop_ids=stop_ids,
        )
        decoder, stops = IncrementalDecoder(self._tok), StopFilter(stop_texts)
        self._batcher.submit(req)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise ModelError(f"generation failed: {item}") from item
                text = stops.feed(decoder.push(item))
                if text:
                    yield text
                if stops.stopped:
                    return  # ``finally`` tells the scheduler to drop the row
            tail = stops.feed(decoder.flush()) + stops.flush()
            if tail:
                yield tail
        finally:
            self._batcher.cancel(req)  # no-op when it already finished
            if usage is not None:  # exact: the tokens the scheduler sampled (a stop token included)
                usage.prompt_tokens, usage.completion_tokens, usage.exact = len(prompt), req.generated, True

    async def aclose(self) -> None:
        await asyncio.to_thread(self._batcher.close)
