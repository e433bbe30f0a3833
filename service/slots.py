"""The decode batch's KV cache on one rank, with rows that join and leave between decode steps (continuous
batching), built on flm's KVCache and left padding.

All rows share one column counter P (`KVCache.pos`). Row b holds its tokens in columns pad[b] .. P-1, and flm's
`pad` makes its positions count from pad[b], so a row is exactly a left-padded prompt of flm/generate.py:

    columns   0 1 2 3 4 5 6 7 8 |P
    row 0     a a a a a a a a a |   joined first (pad 0)
    row 1     . . . . b b b b b |   joined at P = 7 with a 3-token prompt (pad 4): positions 0, 1, 2, ...
    row 2     . . c c c c c c c |

A joining request is prefilled on its own (a small cache, positions from 0) and its keys/values are copied into
columns P-L .. P-1 of a free row; a prompt longer than P first shifts every row right. A leaving row is replaced by
the last row (rows stay contiguous, so a decode step runs on rows 0 .. n-1 only). A decode step reads columns
min(pad) .. P-1 only (the columns every row has left are skipped, not shifted); when P reaches the capacity, every
row is shifted left by the smallest pad. Each row spans at most the model's context, so with a capacity above
the context a shift always frees a column.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from flm.model import GPT, KVCache


def release_moves(active: int, rows: Iterable[int]) -> list[tuple[int, int]]:
    """(src, dst) row copies that remove `rows` from a batch of `active` rows, keeping the others contiguous:
    each removed row, highest first, takes the current last row. The engine and every shard apply the same moves."""
    moves = []
    for r in sorted(set(rows), reverse=True):
        if not 0 <= r < active:
            raise IndexError(f"row {r} is not one of {active} active rows")
        active -= 1
        if r != active:
            moves.append((active, r))
    return moves


def apply_release(items: list, rows: Iterable[int]) -> list:
    """`items` (one per active row) after `release_moves`: what the engine keeps beside the shards' caches."""
    items = list(items)
    moves = release_moves(len(items), rows)
    for src, dst in moves:
        items[dst] = items[src]
    return items[:len(items) - len(set(rows))]


class SlotBatch:
    """One rank's running batch: up to `max_batch` rows in a KV cache of `capacity` columns."""

    def __init__(self, model: GPT, max_batch: int, capacity: int):
        if capacity <= model.cfg.seq_len:
            raise ValueError(f"capacity {capacity} must exceed the context ({model.cfg.seq_len} tokens)")
        self.model, self.max_batch = model, max_batch
        w = model.wte.weight
        with torch.inference_mode():  # inference tensors: no version counting on every cache write
            self.cache = KVCache.empty(model.cfg, max_batch, capacity, w.device, w.dtype)
            self.pad = torch.zeros(max_batch, dtype=torch.long, device=w.device)
        self.rows = 0

    def reset(self) -> None:
        """Drop every row."""
        self.rows, self.cache.pos = 0, 0

    @property
    def capacity(self) -> int:
        return self.cache.max_len

    @torch.inference_mode()
    def step(self, release: list[int], tokens: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Remove the `release` rows, decode one token per remaining row (`tokens`, in row order after the
        removal), then append the `prompts` as new rows. Returns each row's next-token logits (rows, vocab)."""
        self._release(release)
        if len(tokens) != self.rows:
            raise ValueError(f"{len(tokens)} tokens for {self.rows} rows")
        out = []
        if tokens:
            out.append(self._decode(tokens))
        if prompts:
            out.append(self._prefill(prompts))
        if not out:
            return torch.empty(0, self.model.cfg.vocab_size)
        return torch.cat(out)

    def _columns(self, fn) -> None:
        """Apply fn(tensor) to every layer's keys and values."""
        for layer in range(len(self.cache.k)):
            fn(self.cache.k[layer])
            fn(self.cache.v[layer])

    def _release(self, rows: list[int]) -> None:
        P = self.cache.pos
        for src, dst in release_moves(self.rows, rows):
            self._columns(lambda t, s=src, d=dst: t[d, :, :P].copy_(t[s, :, :P]))
            self.pad[dst] = self.pad[src]
        self.rows -= len(set(rows))
        if self.rows == 0:
            self.cache.pos = 0

    def _shift(self, by: int) -> None:
        """Move every row's columns by `by` (> 0: right, < 0: left) and its pad with them."""
        n, P = self.rows, self.cache.pos
        if by > 0:
            self._columns(lambda t: t[:n, :, by:P + by].copy_(t[:n, :, :P].clone()))
        else:
            self._columns(lambda t: t[:n, :, :P + by].copy_(t[:n, :, -by:P].clone()))
        self.pad[:n] += by
        self.cache.pos += by

    def _decode(self, tokens: list[int]) -> torch.Tensor:
        pad = self.pad[:self.rows]
        lo = int(pad.min())  # no row reads a column before this one
        if self.cache.pos == self.capacity:
            if lo == 0:
                raise ValueError(f"a row spans all {self.capacity} columns: longer than the context")
            self._shift(-lo)
            pad, lo = self.pad[:self.rows], 0
        idx = torch.tensor(tokens, device=self.pad.device).view(-1, 1)
        # attention reads columns lo .. P only: the cache seen from column lo is a left-padded batch like any other
        # (row b's pad shrinks by lo, its positions stay), so the columns every row has left cost nothing
        cache = self.cache
        if lo:
            cache = KVCache([k[:, :, lo:] for k in self.cache.k], [v[:, :, lo:] for v in self.cache.v],
                            self.cache.pos - lo)
            pad = pad - lo
        # no row padded (one request, or rows that joined together): the plain causal path, without the padding
        # mask and the per-row position gather (the same numbers, fewer kernels per step)
        logits, _ = self.model(idx, cache=cache, pad=pad if bool(pad.any()) else None)
        if lo:
            self.cache.pos += 1
        return logits[:, -1]

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        n, longest = len(prompts), max(len(p) for p in prompts)
        if self.rows + n > self.max_batch:
            raise ValueError(f"{self.rows} + {n} rows exceed the batch of {self.max_batch}")
        if min(len(p) for p in prompts) == 0 or longest >= self.capacity:
            raise ValueError(f"prompts need 1 to {self.capacity - 1} tokens")
        device, cfg = self.pad.device, self.model.cfg
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        idx = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
        own = KVCache.empty(cfg, n, longest, device, self.cache.k[0].dtype)
        logits, _ = self.model(idx, cache=own, pad=pad)
        if self.cache.pos < longest:
            self._shift(longest - self.cache.pos)
        P, r = self.cache.pos, self.rows
        for layer in range(cfg.n_layer):
            self.cache.k[layer][r:r + n, :, P - longest:P] = own.k[layer]
            self.cache.v[layer][r:r + n, :, P - longest:P] = own.v[layer]
        self.pad[r:r + n] = pad + (P - longest)
        self.rows += n
        return logits[:, -1]
