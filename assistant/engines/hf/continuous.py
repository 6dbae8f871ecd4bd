"""Continuous batching for the in-process transformers engine: the decode state of the rows being answered.

A request joins the running batch at the next decoding step (its prompt is prefilled on its own KV cache, then
its rows are left-padded into the batch's cache) and leaves it the step it ends (its rows are dropped and the
padding no remaining row needs is trimmed). Each row keeps its own adapter name and its own sampling settings,
so users with different adapters and different sliders share every step.

Owns: the KV cache rows, attention mask and positions of the batch, and per-row sampling (repetition penalty,
temperature, top-k, top-p, a seeded generator per row: ``engines.sampling``). Knows nothing of users,
queues, adapters' files or streaming: the backend hands it prompts and a forward function and gets token ids
back."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from assistant.engines.sampling import Sampling, generator, sample

Forward = Callable[..., torch.Tensor]
"""``forward(names, input_ids=, attention_mask=, position_ids=, cache=)`` -> last-position logits ``[rows, vocab]``;
``names`` is each row's adapter name (None: the base model)."""


class RowBatch:
    """The rows decoding together: one KV cache for all of them, left-padded to a common length."""

    def __init__(self, forward: Forward, pad_id: int, top_k: int | None, device):
        self.forward, self.pad_id, self.top_k, self.device = forward, pad_id, top_k, device
        self._reset()

    def _reset(self) -> None:
        self.names: list[str | None] = []
        self.sampling: list[Sampling] = []
        self.generators: list[torch.Generator | None] = []
        self.cache = None
        self.mask = self.positions = self.last = self.seen = None  # [rows, width], [rows] x2, [rows, vocab]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def width(self) -> int:
        """Columns of the cache (the longest row plus the padding of the others)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def admit(self, prompts: Sequence[list[int]], names: Sequence[str | None],
              sampling: Sequence[Sampling]) -> list[int]:
        """Prefill ``prompts`` together (each with its adapter), join them to the batch and return each one's
        first token. On an error the batch is unchanged: the newcomers never joined."""
        from transformers import DynamicCache

        device = self.device
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.forward(list(names), input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, list(prompt)] = True
        generators = [generator(s.seed, device) for s in sampling]
        tokens = sample(logits, seen, list(sampling), generators, self.top_k)
        seen[torch.arange(len(prompts), device=device), tokens] = True
        self._join(cache, mask, positions[:, -1] + 1, tokens, seen)
        self.names += list(names)
        self.sampling += list(sampling)
        self.generators += generators
        return tokens.tolist()

    def step(self) -> list[int]:
        """Decode one token for every row; return them in row order."""
        rows = len(self)
        self.mask = torch.cat([self.mask, self.mask.new_ones(rows, 1)], dim=1)
        logits = self.forward(self.names, input_ids=self.last[:, None], attention_mask=self.mask,
                              position_ids=self.positions[:, None], cache=self.cache)
        tokens = sample(logits, self.seen, self.sampling, self.generators, self.top_k)
        self.positions = self.positions + 1
        self.last = tokens
        self.seen[torch.arange(rows, device=tokens.device), tokens] = True
        return tokens.tolist()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices, in order); drop the padding columns no kept row needs."""
        if len(rows) == len(self):
            return
        if not rows:
            self._reset()
            return
        index = torch.tensor(list(rows), device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.last, self.seen = (t[index] for t in (self.mask, self.positions, self.last,
                                                                              self.seen))
        self.names = [self.names[i] for i in rows]
        self.sampling = [self.sampling[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())  # padding columns every kept row has
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]

    def _join(self, cache, mask, positions, tokens, seen) -> None:
        if self.cache is None:
            self.cache, self.mask, self.positions, self.last, self.seen = cache, mask, positions, tokens, seen
            return
        width = max(self.width, mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])
        self.seen = torch.cat([self.seen, seen])


def _pad_left(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """``t`` with zeros added before its ``dim`` axis up to ``width`` (KV: [rows, heads, seq, dim]; mask: [rows,
    seq])."""
    missing = width - t.shape[dim]
    if not missing:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)
