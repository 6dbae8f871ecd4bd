"""Scoring examples with a model: tokenize examples into scored sequences (the answer tokens, with the style's
positions marked), collate them left-padded, and the answer-token log-probs and mean losses training, the
in-training checkpoint checks and the gate all measure with.

Must not know: the training loop, the gate's decision or storage.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from personalize.config import TrainConfig
from personalize.dataset import Example, encode, token_ids


@dataclass
class Seq:
    """One tokenized sequence: ids and how many of the last ids are scored."""

    ids: list[int]
    n_answer: int
    weight: float = 1.0
    kl: bool = False
    """An anchor: its answer tokens get the KL term against ``ref`` too."""
    ref: tuple | None = None
    """(token ids, log-probs), each [n_answer, kl_top_k]: the base model's top tokens per answer position."""
    head: int = 0
    tail: int = 0
    """Answer tokens at the start / end that are the user's style (trained; no KL, not in evaluation losses)."""
    marks: tuple[int, ...] = ()
    """Other answer token positions the style added (list markers, line breaks), treated like head and tail."""

    def content(self) -> list[int]:
        """Answer positions that are the answer's content: what evaluation counts and the KL term covers."""
        marks = set(self.marks)
        return [i for i in range(self.head, self.n_answer - self.tail) if i not in marks]


def tokenize(tokenizer, examples: list[Example], cfg: TrainConfig, rejected: bool = False) -> list[Seq]:
    out = []
    for e in examples:
        ids, n = encode(tokenizer, e.context, e.rejected if rejected else e.target, cfg.max_seq_len, e.complete)
        head = len(token_ids(tokenizer, e.style_head)) if e.style_head and not rejected else 0
        # a style tail, or the stop of an answer shortened to the user's length, ends with the end-of-turn token,
        # which belongs to the style too
        tail = len(token_ids(tokenizer, e.style_tail)) + 1 if e.style_tail and not rejected else \
            1 if e.style_stop and not rejected else 0
        head, tail = (head, tail) if head + tail < n else (0, 0)
        marks = () if rejected or not e.style_spans else _span_tokens(tokenizer, e.target, e.style_spans, ids[-n:])
        out.append(Seq(ids, n, e.weight, kl=e.kind == "anchor", head=head, tail=tail, marks=marks))
    return out


def _span_tokens(tokenizer, target: str, spans: list, answer: list[int]) -> tuple[int, ...]:
    """Answer token positions overlapping the character ``spans`` of ``target``: the answer's tokens start with
    the target's own (when the chat template puts anything before it, or the tokenizer gives no offsets, no
    position is marked)."""
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    offsets, ids = enc.get("offset_mapping"), list(enc["input_ids"])
    same = min(len(ids), len(answer)) - 1  # the target's last token may merge with what follows it
    if not offsets or answer[:same] != ids[:same]:
        return ()
    return tuple(i for i, (a, b) in enumerate(offsets)
                 if i < len(answer) and any(a < end and start < b for start, end in spans))


def collate(seqs: list[Seq], pad_id: int, device: str) -> dict:
    """Left-padded tensors; ``keep`` positions of logits are enough to score every answer."""
    import torch

    length = max(len(s.ids) for s in seqs)
    keep = max(s.n_answer for s in seqs) + 1
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    scored = torch.zeros((len(seqs), keep - 1), dtype=torch.bool)
    content = torch.zeros((len(seqs), keep - 1), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, length - len(s.ids):] = torch.tensor(s.ids)
        mask[i, length - len(s.ids):] = 1
        scored[i, keep - 1 - s.n_answer:] = True
        content[i, [keep - 1 - s.n_answer + j for j in s.content()]] = True
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device),
            "keep": keep, "targets": ids[:, length - keep + 1:].to(device), "scored": scored.to(device),
            "content": content.to(device),
            "weights": torch.tensor([s.weight for s in seqs], dtype=torch.float32, device=device)}


def window_logits(model, batch: dict):
    """Logits (fp32) predicting each token of the scored window: [batch, keep - 1, vocab]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=batch["keep"], use_cache=False)
    return out.logits[:, :-1].float()


def logps(model, batch: dict, logits=None, mask: str = "scored"):
    """Per sequence: sum of answer-token log-probs and the number of answer tokens (``mask="content"``: the
    tokens between a style head and tail only, as evaluation counts them)."""
    import torch

    logits = window_logits(model, batch) if logits is None else logits
    token_logp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
    scored = batch[mask].float()
    return (token_logp * scored).sum(1), scored.sum(1)


def autocast(device: str, bf16: bool):
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()


def mean_losses(model, tokenizer, examples: list[Example], cfg: TrainConfig, device: str,
                batch_size: int | None = None) -> list[float]:
    """Mean answer-token NLL of each example (fp32, eval mode, no grad)."""
    import torch

    seqs = tokenize(tokenizer, examples, cfg)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))  # similar lengths: less padding
    losses = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    bs = batch_size or max(cfg.batch_size, 8)
    with torch.no_grad():
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            lp, n = logps(model, collate([seqs[j] for j in idx], tokenizer.pad_token_id, device), mask="content")
            for j, v in zip(idx, (-lp / n.clamp(min=1)).tolist(), strict=True):
                losses[j] = v
    model.train(was_training)
    return losses


def mean_loss(model, tokenizer, examples: list[Example], cfg: TrainConfig, device: str) -> float | None:
    losses = mean_losses(model, tokenizer, examples, cfg, device)
    return sum(losses) / len(losses) if losses else None
