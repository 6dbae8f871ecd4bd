"""TrainConfig: every knob of one personalization run (data, LoRA, losses, replay, gate, publish)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

DEFAULT_SYSTEM_PROMPT = "You are Attune, a helpful personal assistant. Answer clearly and concisely."
"""The system prompt examples are trained under; keep it equal to ChatConfig.system_prompt of serving."""
PREFERENCE_LOSSES = ("dpo", "none")
DEVICES = ("auto", "cpu", "cuda")
QUANTS = ("auto", "nf4", "none")
PRECISIONS = ("auto", "bf16", "no")
ATTENTIONS = ("auto", "eager", "sdpa")


@dataclass
class TrainConfig:
    """How one training job builds its data, trains, gates and publishes a user's adapter."""

    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout on the adapter input. 0 by measurement: on this 2-core CPU drawing the dropout masks of the
    210 LoRA layers was 20% of a training step (BENCHMARKS.md, "Training"); early stopping on held-out loss and
    the KL term to the base model are the run's regularizers."""
    target_modules: str = "all-linear"
    """peft target modules: ``all-linear`` (every linear layer but the LM head) or comma-separated names."""
    lr: float = 5e-4
    """AdamW learning rate (linear warmup over the first 10% of steps, then linear decay)."""
    epochs: int = 3
    """Passes over the run's examples (capped by ``max_steps``)."""
    max_steps: int = 300
    """Most optimizer steps in one run."""
    batch_size: int = 4
    """Examples per optimizer step."""
    max_seq_len: int = 512
    """Longest example in tokens; longer ones keep the answer and the end of their context."""
    heldout_fraction: float = 0.2
    """Share of the user's answers (by a hash of the message id) held out for the gate, never trained on."""
    max_eval_examples: int = 64
    """Most held-out examples scored by the gate (the newest)."""
    min_examples: int = 2
    """A run needs at least this many training examples (user's own, not replay) or it is skipped."""
    like_weight: float = 2.0
    """Loss weight of a liked answer (a plain answer weighs 1)."""
    correction_weight: float = 2.0
    """Loss weight of a user's correction (it replaces the answer it corrects)."""
    preference_loss: str = "dpo"
    """``dpo``: corrected answers train chosen=correction over rejected=original; ``none`` to skip."""
    beta: float = 0.1
    """DPO / KTO temperature on the log-ratio against the base model (adapter disabled)."""
    preference_weight: float = 1.0
    """Weight of the DPO term."""
    undesirable_weight: float = 0.5
    """Weight of the KTO-style term pushing disliked answers (without correction) below the base model."""
    anchor_ratio: float = 0.3
    """Share of each run's examples drawn from the general anchor set (0 disables pseudo-rehearsal).

    Measured on SmolLM2-135M with ~20 personal examples (tests/test_personalize_real.py): general
    anchor loss +0.71 nats/token at 0, +0.34 at 0.1, +0.11 at 0.2, +0.01 at 0.25, -0.05 at 0.3, while
    the held-out loss fell 2.23 -> 1.0-1.2 in every case; small runs need more than the 1-5% that
    large fine-tunes use, because a handful of examples is repeated for several epochs."""
    anchor_count: int = 256
    """How many of the shipped anchor prompts the base model answers (once, then cached)."""
    anchor_max_new_tokens: int = 48
    """Length of the base model's greedy anchor answers."""
    anchor_eval_fraction: float = 0.25
    """Share of the anchor set held out to measure general loss at the gate (never trained on)."""
    anchor_margin: float = 0.05
    """Largest allowed rise of the general anchor loss over the base model, in nats per token."""
    ability_checks: int = 64
    """General questions with known answers (personalize/general_checks.txt) the candidate must still answer
    right about as often as the base model (personalize.ability; ``ability_margin``, ``ability_z``; 0 disables)."""
    ability_margin: int = 2
    """How many more general checks the candidate may lose (base right, candidate wrong) than it gains, whatever
    chance says."""
    ability_z: float = 1.645
    """Beyond ``ability_margin``, a difference is forgetting only when McNemar's test tells it from noise:
    lost - gained > ability_z * sqrt(lost + gained) (1.645: one-sided 5%)."""
    ability_max_new_tokens: int = 48
    """Length of the greedy answers to the general checks."""
    ability_repetition_penalty: float = 1.1
    """Repetition penalty of those answers: serving's default (assistant.engines.base.GenerationSettings). Measured
    on one dev user's adapter: 36/64 checks right vs the base model's 50 decoded at 1.0, while the same adapter
    answered the bench's dev general questions better than the base model at 1.1 (43 vs 38 of 70)."""
    min_improvement: float = 0.0
    """The held-out loss must drop by more than this (nats per token) below the active version's."""
    kl_weight: float = 1.0
    """Weight of the distillation term on anchor examples: KL from the base model's next-token distribution
    (its top ``kl_top_k`` log-probs, computed once with the adapter disabled) to the adapter's, per answer
    token. Keeps general answers close to the base model's; 0 trains anchors with plain SFT only."""
    kl_top_k: int = 16
    """How many of the base model's most likely tokens per anchor answer position the KL term keeps."""
    eval_every: int = 0
    """Steps between the in-training checks (monitor anchors + held-out) that pick the checkpoint to keep;
    0 = about 6 checks per run. Training always checks at its end too."""
    monitor_anchors: int = 16
    """Anchors (taken out of training, apart from the gate's slice) whose loss rise the in-training checks watch."""
    monitor_heldout: int = 16
    """Most held-out examples (the newest) scored by each in-training check."""
    select_safety: float = 0.8
    """A checkpoint is kept only if its monitor anchor rise is within ``select_safety * anchor_margin``."""
    patience: int = 3
    """Stop after this many checks in a row without a better checkpoint within the margin (0 never stops early);
    with 2, users with a handful of held-out answers stopped on noise (BENCHMARKS.md, "Quality")."""
    min_steps: int = 60
    """Fewest optimizer steps of a run: small datasets get more epochs (still capped by ``max_steps``)."""
    fact_questions: int = 5
    """Question/answer examples made from each statement the user made about themselves (0 disables). Measured
    with min_steps 60 and patience 3 against 3 / 40 / 2 (bench quality, 3 users): adapter-only recall 13/25 vs
    at most 8/25, adapter + memory 22/25 vs at most 21/25, general QA unchanged, jobs ~1.6x longer."""
    never_told: int = 8
    """Questions about things the user never mentioned (a sister, a car; personalize.facts.untold_questions),
    answered "You haven't told me about your ...", added to each run (0 disables). Chosen on the dev users of
    bench adapter_passing: with 8, never-told questions got "you haven't told me" 7/15 with the adapter alone and
    8/15 with memory (0/15 and 0/15 with none; base model 3/15), fact recall with memory 17/40 (20/40 with none)."""
    fact_weight: float = 1.0
    """Loss weight of a fact question/answer example."""
    max_facts: int = 64
    """Most statements (the newest) turned into question/answer examples in one run."""
    memory_fraction: float = 0.5
    """Share of fact and answer examples rendered with the memory block serving would show (the relevant fact
    and 0-2 of the user's other facts); held-out facts always get it."""
    anchor_memory_fraction: float = 0.2
    """Share of anchor examples rendered with a memory block of the user's unrelated facts (to ignore)."""
    filler_weight: float = 0.0
    """Loss weight of an uncorrected acknowledgment ("Noted!", "Got it, you live in Lyon.") of a message that
    asks nothing; 0 drops them (they taught adapters to acknowledge instead of answering)."""
    filler_max_words: int = 12
    """An answer of at most this many words can be filler."""
    max_target_repeats: int = 3
    """Most examples sharing one near-identical target (case, punctuation, digits folded); the rest are dropped."""
    reservoir_size: int = 256
    """Per-user replay reservoir size (examples already learned, kept for later runs)."""
    reservoir_mix: int = 64
    """Most reservoir examples mixed into one run."""
    keep_versions: int = 5
    """Published versions kept on disk per user (older ones are pruned; the active one always stays)."""
    attention: str = "auto"
    """Attention kernel while training and scoring: ``auto`` (``eager`` on CPU, where the short sequences of a
    personal run trained 15% faster than with ``sdpa``; ``sdpa`` on CUDA), ``eager`` or ``sdpa``."""
    seed: int = 0
    """Seed for LoRA init, shuffling and dropout: the same data and seed give the same adapter."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    quant: str = "auto"
    """Base weights while training: ``auto`` (NF4 QLoRA on CUDA, fp32 on CPU), ``nf4`` or ``none``."""
    mixed_precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA and on CPUs with native bf16), ``bf16`` or ``no``; the gate is fp32."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System message every example is trained and scored under ('' to use the conversation's own)."""

    def __post_init__(self):
        for name in ("rank", "alpha", "epochs", "max_steps", "batch_size", "max_eval_examples", "min_examples",
                     "keep_versions", "anchor_max_new_tokens", "ability_max_new_tokens", "kl_top_k", "monitor_heldout",
                     "filler_max_words", "max_target_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer of at least 1, got {value!r}")
        for name in ("anchor_count", "reservoir_size", "reservoir_mix", "seed", "eval_every", "monitor_anchors",
                     "patience", "min_steps", "fact_questions", "max_facts", "never_told", "ability_checks",
                     "ability_margin"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be an integer of at least 0, got {value!r}")
        if self.max_seq_len < 32:
            raise ValueError(f"max_seq_len: must be at least 32 tokens, got {self.max_seq_len!r}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr: must be between 0 and 1, got {self.lr!r}")
        for name in ("dropout", "anchor_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("memory_fraction", "anchor_memory_fraction", "select_safety"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("heldout_fraction", "anchor_eval_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}: must be between 0 and 1, got {getattr(self, name)!r}")
        for name in ("like_weight", "correction_weight", "beta", "preference_weight", "undesirable_weight",
                     "anchor_margin", "min_improvement", "kl_weight", "fact_weight", "filler_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.ability_z < 0:
            raise ValueError(f"ability_z: must be >= 0, got {self.ability_z!r}")
        if not 1 <= self.ability_repetition_penalty <= 2:
            raise ValueError("ability_repetition_penalty: must be from 1 to 2, "
                             f"got {self.ability_repetition_penalty!r}")
        if self.beta == 0:
            raise ValueError("beta: must be > 0")
        if not isinstance(self.target_modules, str) or not self.target_modules.strip():
            raise ValueError("target_modules: give 'all-linear' or comma-separated module names")
        if self.preference_loss not in PREFERENCE_LOSSES:
            raise ValueError(f"preference_loss: must be one of {', '.join(PREFERENCE_LOSSES)}, "
                             f"got {self.preference_loss!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant: must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision: must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if not isinstance(self.system_prompt, str):
            raise ValueError("system_prompt: must be a string")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: not a TrainConfig field (known: {', '.join(sorted(known))})")
        return cls(**data)

    def peft_targets(self) -> str | list[str]:
        return "all-linear" if self.target_modules.strip() == "all-linear" else [
            m.strip() for m in self.target_modules.split(",") if m.strip()]
