"""The evaluation gate: a candidate adapter is published only if it is better for its user and
not worse in general.

- Held-out loss: mean answer-token NLL of the user's held-out examples (never trained on) under
  the candidate must be lower (by more than ``min_improvement``) than under the active version,
  or under the base model when the user has none.
- General loss: mean NLL of the held-out anchor slice (the base model's own answers to everyday
  prompts, re-targeted in the user's style with the style's tokens left out) under the candidate may rise at
  most ``anchor_margin`` nats/token above the base model. Not applied when the user's style reshapes answers
  (short answers, lists): the base model's wording is then not what this user's answers should say.
- General ability: of the general checks (personalize.ability), the candidate may get at most
  ``ability_margin`` more wrong that the base model got right than the other way round, or a difference
  within chance (McNemar, ``ability_z``): what answers say, whatever their style.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from personalize.ability import Ability
from personalize.config import TrainConfig
from personalize.dataset import Example
from personalize.scoring import mean_loss, mean_losses
from storage.paths import atomic_write_bytes


@dataclass
class GateResult:
    """The gate's verdict, its reason in words, and the numbers behind it."""

    passed: bool
    reason: str
    heldout_loss: float
    heldout_loss_before: float
    anchor_loss: float | None
    anchor_loss_base: float | None
    anchor_rise: float | None
    ability: dict | None = None
    """General checks right, base vs candidate (personalize.ability.Ability.to_dict), when measured."""
    anchors_judged: bool = True
    """False when the user's style reshapes answers and the anchor loss was not applied."""
    code: str = ""
    """``published``, ``not_improved`` or ``general_worse``: what the reason says, for a UI to word it in the
    user's language (the reason itself is English, for logs and the CLI)."""

    def to_dict(self) -> dict:
        return asdict(self)


def decide(heldout_before: float, heldout_after: float, anchor_base: float | None, anchor_after: float | None,
           cfg: TrainConfig, baseline: str, ability: Ability | None = None, reshaped: bool = False) -> GateResult:
    """Apply the rules; ``baseline`` names what the candidate is compared with (``v3``, ``base``); ``reshaped``:
    the user's style changes answers' length or form, so the anchor loss is reported but not applied."""
    rise = None if anchor_base is None or anchor_after is None else anchor_after - anchor_base
    gain = heldout_before - heldout_after
    improved = gain > cfg.min_improvement
    anchors_ok = rise is None or rise <= cfg.anchor_margin or reshaped
    ability_ok = ability is None or ability.kept(cfg.ability_margin, cfg.ability_z)
    general_ok = anchors_ok and ability_ok
    held = f"held-out loss {heldout_before:.4f} ({baseline}) -> {heldout_after:.4f}"
    general = "no general anchors" if rise is None else \
        f"general anchor loss {rise:+.4f} vs base (margin {cfg.anchor_margin:.4f}" + \
        ("; not applied: the user's style reshapes answers)" if reshaped else ")")
    if ability is not None:
        general += (f"; general checks right {ability.candidate}/{ability.total} vs base {ability.base} "
                    f"({ability.lost} lost, {ability.gained} gained; at most {cfg.ability_margin} more lost, or "
                    "within chance)")
    if improved and general_ok:
        reason = f"Published: {held}; {general}."
    elif not improved:
        need = f" by more than {cfg.min_improvement:.4f}" if cfg.min_improvement else ""
        reason = (f"Rejected: the user's held-out loss did not improve{need} ({held}); {general}. Kept {baseline}. "
                  "More varied conversations or feedback usually help.")
    else:
        reason = (f"Rejected: general answers would get worse ({general}, over the margin); {held}. Kept {baseline}. "
                  "Raise anchor_ratio or lower lr/epochs.")
    code = "published" if improved and general_ok else "not_improved" if not improved else "general_worse"
    return GateResult(improved and general_ok, reason, heldout_after, heldout_before, anchor_after, anchor_base, rise,
                      ability.to_dict() if ability is not None else None, not reshaped, code)


def heldout_loss(model, tokenizer, heldout: list[Example], cfg: TrainConfig, device: str) -> float | None:
    return mean_loss(model, tokenizer, heldout, cfg, device)


def preference_margin(model, tokenizer, pairs: list[Example], cfg: TrainConfig, device: str) -> float | None:
    """Mean per-token log-prob margin of chosen (correction) over rejected answers; higher is better."""
    if not pairs:
        return None
    chosen = mean_losses(model, tokenizer, pairs, cfg, device)
    rejected = mean_losses(model, tokenizer, [replace(e, target=e.rejected) for e in pairs], cfg, device)
    return sum(r - c for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def base_losses(model, tokenizer, heldout: list[Example], anchors: list[Example], cfg: TrainConfig,
                device: str, cache: Path | None = None, where: str = "") -> tuple[float | None, float | None]:
    """(held-out, anchor) loss of the base model: the peft model with its adapter disabled. The anchor losses
    are kept in ``cache`` (see :func:`cached_mean_loss`; ``where`` names the device, quant and kernel)."""
    with model.disable_adapter():
        return (mean_loss(model, tokenizer, heldout, cfg, device),
                cached_mean_loss(model, tokenizer, anchors, cfg, device, cache, where))


def cached_mean_loss(model, tokenizer, examples: list[Example], cfg: TrainConfig, device: str,
                     cache: Path | None, where: str) -> float | None:
    """Mean loss of ``examples``, each example's loss read from / added to the JSON file ``cache``.

    Only for a model that never changes (the base, per cache file): the base's loss on the gate's anchors is
    the same for every user and job, so it is scored once (a style the user taught changes the anchors' text
    and so their keys)."""
    if cache is None:
        return mean_loss(model, tokenizer, examples, cfg, device)
    stored = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    keys = [_loss_key(e, cfg, where) for e in examples]
    todo = [i for i, k in enumerate(keys) if k not in stored]
    if todo:
        for i, loss in zip(todo, mean_losses(model, tokenizer, [examples[i] for i in todo], cfg, device),
                           strict=True):
            stored[keys[i]] = loss
        atomic_write_bytes(cache, json.dumps(stored).encode("utf-8"))
    losses = [stored[k] for k in keys]
    return sum(losses) / len(losses) if losses else None


def _loss_key(e: Example, cfg: TrainConfig, where: str) -> str:
    text = json.dumps([where, cfg.max_seq_len, e.context, e.target, e.complete, e.style_head, e.style_tail,
                       e.style_stop, e.style_spans],
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
