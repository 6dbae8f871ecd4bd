"""Keeping the best checkpoint while training, so a run respects the gate by construction.

Every ``eval_every`` steps (and at the end) the trainer asks :class:`BestCheckpoint` to check the
adapter: the mean loss of the monitor anchors (a slice of the anchor set taken out of training and
apart from the gate's slice) against the base model's, and the user's held-out loss. A check whose
anchor rise is within ``select_safety * anchor_margin`` and whose held-out loss is the lowest so far
becomes the kept checkpoint (a copy of the trainable LoRA weights). Once one is kept, training stops
early after ``patience`` checks in a row without a better one. At the end the kept weights are put
back; if no check qualified, the one with the smallest anchor rise is (the gate will then say why).
The gate (personalize.gate) still judges what is published, on its own anchor slice and, when the user has
enough held-out answers, on its own half of them (:func:`selection_split`): a checkpoint picked on the very
examples that judge it would be judged in-sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from personalize.config import TrainConfig
from personalize.dataset import Example
from personalize.facts import target_key
from personalize.scoring import autocast, mean_loss

MIN_SPLIT = 4
"""Fewest held-out answers on each side before checkpoint selection and the gate get separate halves."""


def selection_split(heldout: list[Example]) -> tuple[list[Example], list[Example]]:
    """(for checkpoint selection, for the gate): the held-out answers alternately, examples saying the same
    (near-identical targets, such as the questions of one fact) on the same side; both the whole list when a
    side would have fewer than ``MIN_SPLIT`` answers."""
    groups: dict[str, list[Example]] = {}
    for e in heldout:
        groups.setdefault(target_key(e.target), []).append(e)
    select, judge = [], []
    for i, group in enumerate(groups.values()):
        (select if i % 2 else judge).extend(group)
    if len(select) < MIN_SPLIT or len(judge) < MIN_SPLIT:
        return heldout, heldout
    order = {id(e): n for n, e in enumerate(heldout)}
    return sorted(select, key=lambda e: order[id(e)]), sorted(judge, key=lambda e: order[id(e)])


@dataclass
class Check:
    """One in-training check."""

    step: int
    heldout_loss: float | None
    anchor_rise: float | None
    within_margin: bool
    kept: bool = False


@dataclass
class Selection:
    """What the checks saw and which step's weights were kept."""

    checks: list[Check] = field(default_factory=list)
    chosen_step: int | None = None
    stopped_early: bool = False
    within_margin: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class BestCheckpoint:
    """Scores the adapter during training and keeps a copy of the best weights within the margin."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, device: str, heldout: list[Example],
                 monitor: list[Example], bf16: bool = False, reshaped: bool = False):
        self.model, self.tokenizer, self.cfg, self.device, self.bf16 = model, tokenizer, cfg, device, bf16
        self.heldout = heldout[-cfg.monitor_heldout:] if heldout else []
        self.monitor = monitor
        # a style that reshapes answers (short, lists) moves the anchors' wording by design: the held-out loss
        # alone picks, and the gate's general checks judge what the answers say
        self.limit = float("inf") if reshaped else cfg.select_safety * cfg.anchor_margin
        self.selection = Selection()
        self._best: tuple[float, dict] | None = None  # (held-out loss, weights)
        self._fallback: tuple[float, int, dict] | None = None  # (anchor rise, step, weights)
        self._since_best = 0
        self.monitor_base = None
        if monitor:
            with model.disable_adapter():
                self.monitor_base = self._loss(monitor)

    def _loss(self, examples: list[Example]) -> float | None:
        """Mean loss in the training precision (bf16 autocast where training uses it: a check only ranks
        checkpoints against the base scored the same way; the gate scores in fp32)."""
        with autocast(self.device, self.bf16):
            return mean_loss(self.model, self.tokenizer, examples, self.cfg, self.device)

    def _weights(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def check(self, step: int) -> bool:
        """Score the adapter now; False when training should stop (no progress for ``patience`` checks)."""
        held = self._loss(self.heldout) if self.heldout else None
        anchor = self._loss(self.monitor) if self.monitor else None
        rise = None if anchor is None or self.monitor_base is None else anchor - self.monitor_base
        ok = rise is None or rise <= self.limit
        check = Check(step, held, rise, ok)
        self.selection.checks.append(check)
        score = held if held is not None else -step  # no held-out: the latest within the margin
        if ok and (self._best is None or score < self._best[0]):
            self._best = (score, self._weights())
            self.selection.chosen_step = step
            check.kept = True
            self._since_best = 0
        else:
            self._since_best += self._best is not None  # before anything is kept, training may still get there
            if self._best is None and rise is not None and (self._fallback is None or rise < self._fallback[0]):
                self._fallback = (rise, step, self._weights())
        return not (self.cfg.patience and self._since_best >= self.cfg.patience)

    def restore(self) -> Selection:
        """Put the kept (or, failing that, the least-forgetting) weights back into the model."""
        import torch

        chosen = self._best[1] if self._best else (self._fallback[2] if self._fallback else None)
        if self._best is None and self._fallback is not None:
            self.selection.chosen_step = self._fallback[1]
        self.selection.within_margin = self._best is not None
        if chosen is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in chosen.items():
                    params[name].copy_(value)
        return self.selection
