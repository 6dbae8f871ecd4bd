"""Per-row LoRA for batches whose rows use different adapters: the base layers run once for the whole batch, then
every LoRA layer adds each row's own delta with two batched matmuls (``bmm``), one pass for all rows.

peft's own mixed-adapter path (``adapter_names``) loops over the adapters of the batch in every layer, gathering
and scattering each adapter's rows: with 8 users on 8 adapters that is 8 small matmul pairs per layer and step,
and on a CPU it cost more than the base model itself. Here the rows' A and B matrices are stacked once per batch
composition (ranks padded with zeros, which adds nothing) and reused every step until a row joins or leaves.

Owns: the stacked weights and the forward hooks that add them. Knows peft's LoRA layers (``lora_A``, ``lora_B``,
``scaling``), nothing of users, requests or decoding. Plain LoRA on linear layers only (what Attune trains);
:meth:`RowLora.supports` says when an adapter needs peft's own path (DoRA and other variants, LoRA biases)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class RowLora:
    """Stacks of the rows' LoRA weights for one batch composition, and the hooks that apply them."""

    def __init__(self):
        self._key: tuple | None = None
        self._layers: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def supports(model, names: Sequence[str | None]) -> bool:
        """True when every adapter of ``names`` is plain LoRA (no variant, no bias) in every layer it touches."""
        wanted = {n for n in names if n is not None}
        for module in _lora_layers(model):
            for name in wanted & set(module.lora_A.keys()):
                if name in getattr(module, "lora_variant", {}) or not isinstance(module.lora_A[name], torch.nn.Linear):
                    return False
                if module.lora_B[name].bias is not None or module.lora_A[name].bias is not None:
                    return False
        return True

    def prepare(self, model, names: Sequence[str | None], generation: int) -> bool:
        """Stack the rows' weights for ``names`` (once per batch composition); False when an adapter among them
        needs peft's own path. ``generation`` changes whenever adapters are loaded or unloaded."""
        key = (id(model), tuple(names), generation)
        if key != self._key:
            self._layers = _stack(model, names) if self.supports(model, names) else None
            self._key = key
        return self._layers is not None

    @contextlib.contextmanager
    def apply(self) -> Iterator[None]:
        """Within: every LoRA layer adds row i's delta of the adapter ``prepare`` was given for that row (None:
        nothing) to its output. The model's own adapter layers must be disabled (they would add theirs too)."""
        handles = [module.register_forward_hook(_hook(a, b)) for module, a, b in self._layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _lora_layers(model) -> Iterator[torch.nn.Module]:
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "scaling"):
            yield module


def _stack(model, names: Sequence[str | None]) -> list:
    """Per LoRA layer used by any row: A as [rows, in, rank] and B times the adapter's scaling as [rows, rank, out]."""
    layers = []
    for module in _lora_layers(model):
        used = [n if n is not None and n in module.lora_A else None for n in names]
        if set(used) == {None}:
            continue
        first = next(module.lora_A[n].weight for n in used if n is not None)
        rank = max(module.lora_A[n].weight.shape[0] for n in used if n is not None)
        rows = len(names)
        a = first.new_zeros(rows, first.shape[1], rank)
        b = first.new_zeros(rows, rank, module.lora_B[next(n for n in used if n)].weight.shape[0])
        for i, n in enumerate(used):
            if n is None:
                continue
            r = module.lora_A[n].weight.shape[0]
            a[i, :, :r] = module.lora_A[n].weight.T
            b[i, :r, :] = module.lora_B[n].weight.T * module.scaling[n]
        layers.append((module, a, b))
    return layers


def _hook(a: torch.Tensor, b: torch.Tensor):
    def add_rows(module, args, output):
        x = args[0]
        xa = torch.bmm(x.reshape(a.shape[0], -1, x.shape[-1]).to(a.dtype), a)
        out = output.reshape(a.shape[0], -1, output.shape[-1]).to(a.dtype)  # as peft adds it: in the LoRA dtype
        return torch.baddbmm(out, xa, b).reshape(output.shape).to(output.dtype)

    return add_rows
