"""How the next token is picked, in one place for both in-process engines (transformers' rows and llama.cpp's
slots), as transformers' ``generate`` picks it: the repetition penalty on every token seen (prompt and answer),
then greedy (temperature 0) or a draw from the row's own generator after temperature, the model's top-k and
top-p. A seeded row draws from its own generator: same seed, same answer, whoever shares the batch.

Must not know: engines, adapters, users."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """One row's sampling settings (see ``GenerationSettings``)."""

    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int | None

    @classmethod
    def of(cls, settings) -> Sampling:
        """The sampling part of a request's ``GenerationSettings``."""
        return cls(settings.temperature, settings.top_p, settings.repetition_penalty, settings.seed)


def generator(seed: int | None, device="cpu") -> torch.Generator | None:
    """A row's own random stream when it asked for a seed (same seed, same answer, whoever shares the batch)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, seen: torch.Tensor, sampling: list[Sampling],
           generators: list[torch.Generator | None], top_k: int | None) -> torch.Tensor:
    """Each row's next token from its last-position ``logits`` [rows, vocab], as ``generate`` picks it: the
    repetition penalty on the tokens the row has seen (prompt and answer), then greedy (temperature 0) or a draw
    from the row's generator after temperature, top-k and top-p."""
    logits = penalize(logits.float(), seen, [s.repetition_penalty for s in sampling])
    tokens = logits.argmax(-1)
    drawn = [i for i, s in enumerate(sampling) if s.temperature > 0]
    if drawn:
        probs = warp(logits[drawn], [sampling[i] for i in drawn], top_k).softmax(-1)
        for row, i in enumerate(drawn):
            tokens[i] = torch.multinomial(probs[row], 1, generator=generators[i])[0]
    return tokens


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalties: list[float]) -> torch.Tensor:
    """The repetition penalty (CTRL's, as transformers applies it) on each row's ``seen`` tokens."""
    penalty = torch.tensor(penalties, device=logits.device)[:, None]
    if not bool((penalty != 1).any()):
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def warp(logits: torch.Tensor, sampling: list[Sampling], top_k: int | None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the likeliest token always stays); removed tokens get -inf."""
    device = logits.device
    scores = logits / torch.tensor([s.temperature for s in sampling], device=device)[:, None]
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    top_p = torch.tensor([s.top_p for s in sampling], device=device)[:, None]
    ordered, order = scores.sort(-1)
    remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
