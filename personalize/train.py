"""LoRA / QLoRA training of one user's adapter: a lean, deterministic loop.

Losses, each on answer tokens only:
- SFT: per-example mean token NLL times the example's weight (user answers, corrections, likes,
  fact question/answer examples, replayed examples and general anchors);
- KL distillation on anchors: ``kl_weight`` times the mean per-token KL from the base model's
  next-token distribution (its top ``kl_top_k`` log-probs, renormalized, computed once with the
  adapter disabled) to the adapter's, so general answers keep the base model's whole distribution
  and not just its greedy tokens;
- DPO on preference pairs (chosen = correction, rejected = the original answer), with the base
  model (peft adapter disabled) as the reference;
- KTO-style undesirable term for disliked answers without correction:
  ``undesirable_weight * sigmoid(beta * (logp - logp_ref))``, bounded, pushes them below the base.

Reference log-probs and anchor distributions are computed once before training (the base never
changes). With a :class:`personalize.checkpoint.BestCheckpoint` the loop checks the adapter every
``eval_every`` steps, keeps the best weights within the anchor margin and stops early. On CUDA the base
is 4-bit NF4 (QLoRA, ``prepare_model_for_kbit_training``); on CPU the same code runs on fp32
weights with bf16 autocast where the CPU has native bf16. Batches are left-padded so every
answer ends at the last position and only the answer window goes through the LM head.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from assistant.model import LoadedModel, ModelConfig, cpu_has_bf16, load_model, resolve_device
from personalize.checkpoint import BestCheckpoint
from personalize.config import TrainConfig
from personalize.dataset import Example
from personalize.errors import TrainingError
from personalize.scoring import Seq, autocast, collate, logps, tokenize, window_logits
from storage.paths import DataDir

log = logging.getLogger("attune.personalize")
Progress = Callable[[int, int, float], None]
GRAD_CLIP = 1.0


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_loss: float | None = None
    selection: dict | None = None
    """What the in-training checks saw and which step was kept (personalize.checkpoint.Selection)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def resolve(cfg: TrainConfig, model_cfg: ModelConfig | None = None) -> tuple[str, str, bool]:
    """(device, quant, bf16 autocast) for this machine.

    ``auto`` in TrainConfig defers to the serving ModelConfig's device, then to the hardware; the
    training quant is NF4 on CUDA (QLoRA) unless ``--quant none`` was asked for, fp32 on CPU.
    """
    device = resolve_device(cfg.device if cfg.device != "auto" or model_cfg is None else model_cfg.device)
    if cfg.quant != "auto":
        quant = cfg.quant
    else:
        quant = "nf4" if device == "cuda" and (model_cfg is None or model_cfg.quant != "none") else "none"
    if quant == "nf4" and device != "cuda":
        raise TrainingError("QLoRA (quant nf4) trains on CUDA only; use quant 'none' (fp32) on CPU.")
    if cfg.mixed_precision == "auto":
        bf16 = device == "cuda" or cpu_has_bf16()
    else:
        bf16 = cfg.mixed_precision == "bf16"
    return device, quant, bf16


def load_base(model_cfg: ModelConfig, cfg: TrainConfig, data_dir: DataDir) -> LoadedModel:
    """A fresh copy of the base model for training (never the serving process's model)."""
    device, quant, _ = resolve(cfg, model_cfg)
    # fp32 master weights on CPU (bf16 autocast does the matmuls); the serving dtype elsewhere.
    dtype = "float32" if device == "cpu" else model_cfg.dtype
    loaded = load_model(ModelConfig(model=model_cfg.model, quant=quant, device=device, threads=model_cfg.threads,
                                    dtype=dtype), data_dir)
    loaded.model.set_attn_implementation(attention(cfg, device))
    return loaded


def attention(cfg: TrainConfig, device: str) -> str:
    """The attention kernel a run trains and scores with (``TrainConfig.attention``)."""
    return cfg.attention if cfg.attention != "auto" else "eager" if device == "cpu" else "sdpa"


def attach_adapter(model, cfg: TrainConfig, quant: str, continue_from: Path | None):
    """Wrap the base in a trainable LoRA: the active adapter's weights when given, else a fresh one."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(cfg.seed)
    if quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if continue_from is not None:
        return PeftModel.from_pretrained(model, str(continue_from), is_trainable=True)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.peft_targets(), task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lora)


# tokenized batches -----------------------------------------------------------------------------
def kl_to_ref(logits, seqs: list[Seq]):
    """Per sequence: mean over answer tokens of KL(base top-k, renormalized || adapter); 0 without a ref."""
    import torch

    lsm = torch.log_softmax(logits, dim=-1)
    out = []
    for i, s in enumerate(seqs):
        if s.ref is None or not s.n_answer:
            out.append(lsm.new_zeros(()))
            continue
        idx, ref = s.ref
        idx, ref = idx.to(lsm.device), ref.to(lsm.device)
        p = torch.softmax(ref, dim=-1)
        student = lsm[i, lsm.shape[1] - s.n_answer:].gather(-1, idx)
        per_token = (p * (torch.log(p.clamp(min=1e-12)) - student)).sum(-1)
        content = s.content()  # the style's tokens are the user's, not the base model's
        out.append(per_token[content].mean() if content else lsm.new_zeros(()))
    return torch.stack(out)


# the loop --------------------------------------------------------------------------------------
def _reference(model, seqs: list[Seq], tokenizer, device: str, bf16: bool) -> list[float]:
    """Sum log-probs under the base model (adapter disabled), once."""
    import torch

    out: list[float] = []
    model.eval()
    with torch.no_grad(), model.disable_adapter(), autocast(device, bf16):
        for i in range(0, len(seqs), 8):
            lp, _ = logps(model, collate(seqs[i:i + 8], tokenizer.pad_token_id, device))
            out.extend(lp.float().tolist())
    return out


def _teacher(model, seqs: list[Seq], tokenizer, device: str, bf16: bool, top_k: int) -> None:
    """Fill ``ref`` of the KL sequences with the base model's top-k log-probs per answer token, once."""
    import torch

    todo = [s for s in seqs if s.kl and s.n_answer]
    model.eval()
    with torch.no_grad(), model.disable_adapter(), autocast(device, bf16):
        for i in range(0, len(todo), 8):
            chunk = todo[i:i + 8]
            logits = torch.log_softmax(window_logits(model, collate(chunk, tokenizer.pad_token_id, device)), -1)
            for j, s in enumerate(chunk):
                top = logits[j, logits.shape[1] - s.n_answer:].topk(top_k, dim=-1)
                s.ref = (top.indices.cpu(), top.values.float().cpu())


def total_steps(cfg: TrainConfig, per_epoch: int) -> int:
    """Steps of a run: ``epochs`` passes, at least ``min_steps`` (small datasets), at most ``max_steps``."""
    return min(cfg.max_steps, max(per_epoch * cfg.epochs, cfg.min_steps)) if per_epoch else 0


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class _Batches:
    """The run's tokenized pools (SFT incl. anchors, preference pairs, undesirables) with their fixed base-model
    references, dealt into shuffled batches one epoch at a time."""

    def __init__(self, model, tokenizer, examples: list[Example], cfg: TrainConfig, device: str, bf16: bool):
        self.rng, self.size, self.half = random.Random(cfg.seed), cfg.batch_size, max(1, cfg.batch_size // 2)
        pairs = [e for e in examples if e.kind == "pair"] if cfg.preference_loss == "dpo" else []
        undesirable = [e for e in examples if e.kind == "undesirable"] if cfg.undesirable_weight > 0 else []
        self.sft = tokenize(tokenizer, [e for e in examples if e.kind in ("sft", "anchor")], cfg)
        chosen, rejected = tokenize(tokenizer, pairs, cfg), tokenize(tokenizer, pairs, cfg, rejected=True)
        und = tokenize(tokenizer, undesirable, cfg)
        if cfg.kl_weight > 0:
            _teacher(model, self.sft, tokenizer, device, bf16, cfg.kl_top_k)
        refs = [_reference(model, seqs, tokenizer, device, bf16) for seqs in (chosen, rejected, und)]
        self.pairs = list(zip(chosen, rejected, refs[0], refs[1], strict=True))
        self.und = list(zip(und, refs[2], strict=True))

    def per_epoch(self) -> int:
        return math.ceil(len(self.sft) / self.size) + math.ceil(len(self.pairs) / self.half) + \
            math.ceil(len(self.und) / self.size)

    def epoch(self) -> list[tuple[str, list]]:
        for pool in (self.sft, self.pairs, self.und):
            self.rng.shuffle(pool)
        batches = [("sft", b) for b in _chunks(self.sft, self.size)]
        batches += [("pair", b) for b in _chunks(self.pairs, self.half)]
        batches += [("und", b) for b in _chunks(self.und, self.size)]
        self.rng.shuffle(batches)
        return batches


def _optimizer(model, cfg: TrainConfig, total: int):
    """(trainable params, AdamW, linear warmup over the first 10% of steps then linear decay)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("The adapter has no trainable parameters; check target_modules.")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    return params, opt, sched


def train(model, tokenizer, examples: list[Example], cfg: TrainConfig, device: str, bf16: bool,
          on_progress: Progress | None = None, best: BestCheckpoint | None = None) -> TrainStats:
    """Train the adapter in place on SFT (incl. anchors), pair and undesirable examples.

    With ``best``, check every ``eval_every`` steps and at the end, stop early when it says so, and
    leave the kept checkpoint's weights in the model."""
    import torch

    torch.manual_seed(cfg.seed)
    pools = _Batches(model, tokenizer, examples, cfg, device, bf16)
    total = total_steps(cfg, pools.per_epoch())
    every = cfg.eval_every or max(1, math.ceil(total / 6))
    stats = TrainStats()
    if total == 0:
        raise TrainingError("Nothing to train on: the run has no examples. Chat more or import history first.")
    params, opt, sched = _optimizer(model, cfg, total)
    model.train()
    started = time.perf_counter()
    step = 0
    going = True
    while step < total and going:
        for kind, batch in pools.epoch():
            if step >= total or not going:
                break
            with autocast(device, bf16):
                loss, ntok = _batch_loss(model, kind, batch, tokenizer.pad_token_id, device, cfg)
            if not torch.isfinite(loss):
                raise TrainingError(f"The training loss became {loss.item()} at step {step + 1}; lower lr "
                                    f"(now {cfg.lr}) and run again.")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            stats.tokens += ntok
            stats.final_loss = float(loss.item())
            if on_progress:
                on_progress(step, total, stats.final_loss)
            if best is not None and (step % every == 0 or step == total):
                going = best.check(step)
                model.train()
    stats.steps = step
    if best is not None:
        if not best.selection.checks or best.selection.checks[-1].step != step:
            best.check(step)
        best.selection.stopped_early = step < total
        stats.selection = best.restore().to_dict()
    stats.seconds = time.perf_counter() - started
    model.eval()
    return stats


def _batch_loss(model, kind: str, batch: list, pad_id: int, device: str, cfg: TrainConfig):
    import torch
    import torch.nn.functional as F

    if kind == "sft":
        b = collate(batch, pad_id, device)
        logits = window_logits(model, b)
        lp, n = logps(model, b, logits)
        loss = (b["weights"] * (-lp / n.clamp(min=1))).sum() / len(batch)
        if cfg.kl_weight > 0 and any(s.ref is not None for s in batch):
            loss = loss + cfg.kl_weight * kl_to_ref(logits, batch).sum() / len(batch)
        return loss, int(b["attention_mask"].sum())
    if kind == "pair":
        b = collate([c for c, *_ in batch] + [r for _, r, *_ in batch], pad_id, device)
        lp, _ = logps(model, b)
        k = len(batch)
        ref = torch.tensor([[rc for *_, rc, _ in batch], [rr for *_, rr in batch]], device=lp.device)
        margin = (lp[:k] - ref[0]) - (lp[k:] - ref[1])
        return cfg.preference_weight * -F.logsigmoid(cfg.beta * margin).mean(), int(b["attention_mask"].sum())
    b = collate([s for s, _ in batch], pad_id, device)
    lp, _ = logps(model, b)
    ratio = lp - torch.tensor([r for _, r in batch], device=lp.device)
    return cfg.undesirable_weight * torch.sigmoid(cfg.beta * ratio).mean(), int(b["attention_mask"].sum())
