"""The running batch's key/value cache: preallocated, left-padded, rows added and dropped in place.

Why not transformers' ``DynamicCache``: it grows by ``torch.cat`` every step, copying the whole
cache of every layer per token. At 32 conversations of 1k tokens on a 6.7B model that is ~16 GB
of copies per step — more than the 13.4 GB of weights the step must read. Here each layer owns one
buffer ``(rows, kv_heads, capacity, head_dim)``; a decode step writes one column in place and
attention reads a view. Every step appends one column for every row; the 2-D attention mask hides
what is not a row's own (left padding, and columns added while a longer newcomer joined), and each
row carries its own position ids, so its RoPE positions are what they would be alone — which is
also why a row's keys need not be contiguous, and nothing has to move when rows join.

Padding slots are kept at zero, never left uninitialised: a masked key still enters ``q @ k``
and a masked value still enters ``weights @ v`` (as 0 * value), so a NaN there would poison a row.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_LEN_STEP = 256  # capacity grows in these steps, so buffers are reallocated rarely


class _SlabLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers is untyped here
    """One layer's view of the slab, shaped like the cache layers transformers' models expect."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._buf_k, self._buf_v, self._length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True
        self.device = keys.device

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        self._buf_k[:, :, self._length : end] = key_states
        self._buf_v[:, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = self._buf_k[:, :, :end], self._buf_v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length


class KVSlab:
    """Keys, values and attention mask of the rows being decoded together."""

    def __init__(self) -> None:
        self.rows = 0
        self.length = 0  # columns in use; every row's last token sits at column length - 1
        self.trims = 0
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.bool)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self._k[0].shape[0], self._k[0].shape[2]) if self._k else (0, 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def clear(self) -> None:
        """Drop every row and free the buffers (the batch went idle)."""
        self.rows = self.length = 0
        self._k, self._v = [], []
        self.mask = torch.zeros(0, 0, dtype=torch.bool)

    def _reserve(self, rows: int, length: int, like: torch.Tensor, n_layers: int) -> None:
        cap_rows, cap_len = self.capacity
        if rows <= cap_rows and length <= cap_len:
            return
        new_rows = max(rows, cap_rows)
        new_len = max(cap_len, -(-length // _LEN_STEP) * _LEN_STEP)
        shape = (new_rows, like.shape[1], new_len, like.shape[3])
        k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(n_layers)]
        v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(n_layers)]
        mask = torch.zeros(new_rows, new_len, dtype=torch.bool, device=like.device)
        for new, old in zip(k + v, self._k + self._v, strict=False):
            new[: self.rows, :, : self.length] = old[: self.rows, :, : self.length]
        mask[: self.rows, : self.length] = self.mask[: self.rows, : self.length]
        self._k, self._v, self.mask = k, v, mask

    def insert(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, headroom: int) -> int:
        """Append rows from a left-padded prefill (keys ``(n, heads, p, dim)``, mask ``(n, p)``).

        Returns the index of the first new row. ``headroom`` columns are reserved for the next
        decode steps so a step rarely reallocates.
        """
        n, p = mask.shape
        keys0 = layers[0][0]
        old_len = self.length
        new_len = max(old_len, p)
        self._reserve(self.rows + n, new_len + headroom, keys0, len(layers))
        r = self.rows
        # A longer newcomer widens the batch; the running rows get masked, zeroed columns there.
        # Nothing moves: with explicit position ids, where a key sits in its row does not matter.
        for buf in self._k + self._v:
            buf[:r, :, old_len:new_len] = 0
        self.mask[:r, old_len:new_len] = False
        lo = new_len - p
        keep = mask.to(keys0.device)[:, None, :, None].bool()
        for (k, v), buf_k, buf_v in zip(layers, self._k, self._v, strict=True):
            for buf, src in ((buf_k, k), (buf_v, v)):
                buf[r : r + n, :, :lo] = 0
                buf[r : r + n, :, lo:new_len] = src.masked_fill(~keep, 0)
        self.mask[r : r + n, :lo] = False
        self.mask[r : r + n, lo:new_len] = mask
        self.rows += n
        self.length = new_len
        return r

    def remove(self, row: int) -> None:
        """Drop one row by moving the last row into its place (the caller mirrors the move)."""
        last = self.rows - 1
        if row != last:
            for buf in self._k + self._v:
                buf[row, :, : self.length] = buf[last, :, : self.length]
            self.mask[row, : self.length] = self.mask[last, : self.length]
        self.rows -= 1
        if self.rows == 0:
            self.length = 0
        else:
            self._trim()

    def _trim(self) -> None:
        """Reclaim leading columns that are padding in every row (a long sequence left)."""
        used = self.mask[: self.rows, : self.length].any(dim=0)
        lead = int(used.int().argmax().item())
        if lead < max(32, self.length // 4):  # not worth a copy yet
            return
        r, t = self.rows, self.length - lead
        for buf in self._k + self._v:
            buf[:r, :, :t] = buf[:r, :, lead : self.length].clone()
            buf[:r, :, t : self.length] = 0
        self.mask[:r, :t] = self.mask[:r, lead : self.length].clone()
        self.mask[:r, t : self.length] = False
        self.length = t
        self.trims += 1

    def step_inputs(self) -> tuple[Cache, torch.Tensor]:
        """A cache for one decode step of every row, and the step's 2-D attention mask."""
        like = self._k[0]
        self._reserve(self.rows, self.length + 1, like, len(self._k))
        r = self.rows
        self.mask[:r, self.length] = True
        layers = [_SlabLayer(k[:r], v[:r], self.length) for k, v in zip(self._k, self._v, strict=True)]
        cache = Cache(layers=list(layers))
        mask = self.mask[:r, : self.length + 1]
        self.length += 1
        return cache, mask
