"""Continuous batching over a causal LM: one thread drives the model for every conversation.

Decode is memory-bound — each step reads all the weights whatever the batch size — so the way to
serve many conversations is to decode them in the same forward pass. The loop, between steps:

1. drops rows whose consumer went away (cancelled, or a stop string was seen),
2. admits waiting requests up to ``max_batch`` rows: one left-padded prefill forward for the
   newcomers, whose keys/values then join the running batch (``KVSlab``),
3. runs one decode step for every row and hands each row's token to its conversation's event
   loop with ``call_soon_threadsafe`` (one callback per loop per step).

A running row never waits for a newcomer's whole generation, only for its prefill. Requests
beyond ``max_batch`` wait in FIFO order, which bounds the KV cache at ``max_batch`` rows of at
most the context length.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from bot.core.errors import ModelError
from bot.llm.local_kv import KVSlab

#: what a conversation's queue receives: token ids, None at the end, or the error that ended it
Delivery = list[int] | BaseException | None

_ids = count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delivery]
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False  # set from the event loop's thread; a bool store is atomic
    generated: int = 0
    last_token: int = -1
    length: int = 0  # tokens in context, including ``last_token`` (not yet fed to the model)


@dataclass
class BatchStats:
    """The scheduler's own record, read by tests and the benchmark."""

    prefills: int = 0
    decode_steps: int = 0
    tokens: int = 0
    max_rows: int = 0  # most sequences decoded in one forward step
    max_waiting: int = 0  # most requests seen queued behind a full batch
    kv_bytes: int = 0  # current size of the KV buffers
    kv_trims: int = 0  # times padding left behind by a departed long sequence was reclaimed


class _Outbox:
    """Deliveries of one scheduler iteration, grouped per event loop."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Delivery]]] = {}

    def put(self, req: Request, item: Delivery) -> None:
        self._by_loop.setdefault(req.loop, []).append((req, item))

    def send(self) -> None:
        for loop, items in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass
        self._by_loop.clear()


def _deliver(items: list[tuple[Request, Delivery]]) -> None:
    for req, item in items:
        req.queue.put_nowait(item)


class Batcher:
    def __init__(self, model: Any, *, max_batch: int, pad_id: int, prefill_tokens: int = 8192) -> None:
        self.model = model
        self.max_batch = max_batch
        self.pad_id = pad_id
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per admission forward
        self.device: torch.device = next(model.parameters()).device
        self.stats = BatchStats()
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # row i of the slab is _active[i]
        self._slab = KVSlab()
        self._closed = False
        self._thread: threading.Thread | None = None

    # --- called from event loops ---------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._cond:
            if self._closed:
                raise ModelError("the model client is closed")
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="codeloop-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Stop the scheduler thread; requests still running end with an error. Blocks."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    # --- the scheduler thread --------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active:
                        self._slab.clear()  # idle: give the KV memory back
                        self._cond.wait()
                    if self._closed:
                        break
                    admitted = self._admit()
                out = _Outbox()
                try:
                    self._drop_cancelled()  # before the prefill: _admit already counted their slots free
                    if admitted:
                        self._prefill(admitted, out)
                    if self._active:
                        self._decode(out)
                except Exception as exc:  # e.g. CUDA OOM: fail what is in flight, keep serving
                    for req in {*self._active, *admitted}:
                        out.put(req, exc)
                    self._active.clear()
                    self._slab.clear()
                out.send()
        out = _Outbox()
        for req in [*self._active, *self._waiting]:
            out.put(req, ModelError("the model client was closed"))
        out.send()

    def _admit(self) -> list[Request]:
        """Pop waiting requests that fit in the batch and the prefill budget (lock held)."""
        admitted: list[Request] = []
        longest = 0
        running = sum(not r.cancelled for r in self._active)
        while self._waiting and running + len(admitted) < self.max_batch:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                continue
            longest = max(longest, len(req.prompt_ids))
            if admitted and longest * (len(admitted) + 1) > self.prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
        self.stats.max_waiting = max(self.stats.max_waiting, sum(not r.cancelled for r in self._waiting))
        return admitted

    def _drop_cancelled(self) -> None:
        for row in range(len(self._active) - 1, -1, -1):
            if self._active[row].cancelled:
                self._remove(row)

    def _remove(self, row: int) -> None:
        self._slab.remove(row)
        self.stats.kv_trims = self._slab.trims
        last = self._active.pop()
        if row < len(self._active):
            self._active[row] = last  # mirrors the slab's move of its last row

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # the lm_head over the whole prompt would be wasted work
            **{self._cache_kw: cache},
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _prefill(self, reqs: list[Request], out: _Outbox) -> None:
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, req in enumerate(reqs):
            ids[i, width - len(req.prompt_ids) :] = torch.tensor(req.prompt_ids)
            mask[i, width - len(req.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        self.stats.prefills += 1
        keep: list[int] = []
        for i, (req, token) in enumerate(zip(reqs, self._sample(logits, reqs), strict=True)):
            req.length = len(req.prompt_ids)
            if not req.cancelled and not self._record(req, token, out):
                keep.append(i)
        if not keep:
            return
        rows = torch.tensor(keep, device=self.device)
        layers = []
        for layer in cache.layers:
            assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
            layers.append((layer.keys[rows], layer.values[rows]))
        headroom = max(reqs[i].max_new_tokens for i in keep)
        self._slab.insert(layers, mask[rows], headroom=min(headroom, 256))
        self._active.extend(reqs[i] for i in keep)

    def _decode(self, out: _Outbox) -> None:
        cache, mask = self._slab.step_inputs()
        ids = torch.tensor([[r.last_token] for r in self._active], device=self.device)
        positions = torch.tensor([[r.length - 1] for r in self._active], device=self.device)
        rows = len(self._active)
        logits = self._forward(ids, mask, positions, cache)
        self.stats.decode_steps += 1
        self.stats.max_rows = max(self.stats.max_rows, rows)
        self.stats.kv_bytes = self._slab.nbytes()
        finished = [
            row
            for row, (req, token) in enumerate(zip(self._active, self._sample(logits, self._active), strict=True))
            if self._record(req, token, out)
        ]
        for row in reversed(finished):
            self._remove(row)

    def _record(self, req: Request, token: int, out: _Outbox) -> bool:
        """Account one sampled token; True when the request is finished."""
        req.generated += 1
        req.length += 1
        req.last_token = token
        self.stats.tokens += 1
        stop = token in req.stop_ids
        if not stop:
            out.put(req, [token])
        done = stop or req.generated >= req.max_new_tokens
        if done:
            out.put(req, None)
        return done

    @staticmethod
    def _sample(logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        tokens = logits.argmax(dim=-1)
        hot = [i for i, r in enumerate(reqs) if r.temperature > 0]
        if hot:
            idx = torch.tensor(hot, device=logits.device)
            temps = torch.tensor([reqs[i].temperature for i in hot], device=logits.device)
            top_p = torch.tensor([reqs[i].top_p for i in hot], device=logits.device)
            probs = torch.softmax(logits[idx].float() / temps[:, None], dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # nucleus: keep the smallest prefix whose mass reaches top_p (always the top token)
            sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]] = 0
            choice = torch.multinomial(sorted_p, 1)
            tokens[idx] = order.gather(-1, choice).squeeze(-1)
        result: list[int] = tokens.tolist()
        return result
