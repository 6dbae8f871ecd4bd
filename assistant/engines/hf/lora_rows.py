"""Per-row LoRA for batches whose rows use different adapters: the base layers run once for the whole batch, then
every LoRA layer adds each row's own delta with two batched matmuls (``bmm``), one pass for all rows.

peft's own mixed-adapter path (``adapter_names``) loops over the adapters of the batch in every layer, gathering
and scattering each adapter's rows: with 8 users on 8 adapters that is 8 small matmul pairs per layer and step,
and on a CPU it cost more than the base model itself. Here the rows' A and B matrices are stacked once per batch
composition (ranks padded with zeros, which adds nothing) and reused every step until a row joins or leaves;
the stacks are the only copies made (rows x adapter size: for a large model and many rows, GPU memory to count).

Owns: the stacked weights and the forward hooks that add them. Knows peft's LoRA layers (``lora_A``, ``lora_B``,
``scaling``), nothing of users, requests or decoding. Plain LoRA on linear layers only (what Attune trains, and
what vLLM serves): :meth:`RowLora.supports` tells the engine which adapters it cannot serve (DoRA and other
variants, LoRA biases); peft itself cannot mix those with other adapters in one batch either."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F


class RowLora:
    """The rows' LoRA weights stacked per batch composition (the last two kept: the rows decoding and the
    newcomers being prefilled), and the hooks that apply them."""

    def __init__(self):
        self._model_key: tuple | None = None
        self._adapters: dict[str, dict | None] = {}  # name -> {layer: (A^T, B^T, scaling)}, None: not plain LoRA
        self._stacks: OrderedDict[tuple, list] = OrderedDict()
        self._current: list = []

    def supports(self, model, name: str) -> bool:
        """True when adapter ``name`` (loaded into ``model``) is plain LoRA on linear layers."""
        return self._weights(model, name) is not None

    def prepare(self, model, names: Sequence[str | None], generation: int) -> None:
        """Get the stacks for ``names`` (row i uses adapter ``names[i]``, None: none; each one :meth:`supports`)
        ready for :meth:`apply`. ``generation`` changes whenever adapters are loaded or unloaded: everything
        derived from the weights is dropped then (it would keep an unloaded adapter's tensors alive)."""
        if (id(model), generation) != self._model_key:
            self._model_key = (id(model), generation)
            self._adapters.clear()
            self._stacks.clear()
        key = tuple(names)
        if key not in self._stacks:
            self._stacks[key] = _stack([None if n is None else self._weights(model, n) for n in names])
            while len(self._stacks) > 2:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(key)
        self._current = self._stacks[key]

    @contextlib.contextmanager
    def apply(self) -> Iterator[None]:
        """Within: every LoRA layer adds each row's delta of the adapter :meth:`prepare` was last given for that
        row. The model's own adapter layers must be disabled (they would add theirs too)."""
        handles = [module.register_forward_hook(_hook(a, b)) for module, a, b in self._current]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _weights(self, model, name: str) -> dict | None:
        if name not in self._adapters:
            self._adapters[name] = _transposed(model, name)
        return self._adapters[name]


def _lora_layers(model) -> Iterator[torch.nn.Module]:
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "scaling"):
            yield module


def _transposed(model, name: str) -> dict | None:
    """Adapter ``name``'s A^T [in, rank], B^T [rank, out] (views, no copies) and scaling per layer; None unless it is
    plain LoRA (no variant such as DoRA, no bias) on linear layers."""
    out = {}
    for module in _lora_layers(model):
        if name not in module.lora_A:
            continue
        a, b = module.lora_A[name], module.lora_B[name]
        if name in getattr(module, "lora_variant", {}) or not isinstance(a, torch.nn.Linear) or \
                a.bias is not None or b.bias is not None:
            return None
        out[module] = (a.weight.T, b.weight.T, module.scaling[name])
    return out


def _stack(weights: list[dict | None]) -> list:
    """Per layer that any row's adapter touches: A as [rows, in, rank], B times the row's scaling as [rows, rank,
    out] (zeros for rows without it)."""
    layers = []
    for module in dict.fromkeys(m for w in weights if w for m in w):  # in model order, each once
        pairs = [w.get(module) if w else None for w in weights]
        a0, b0, _ = next(p for p in pairs if p)
        rank = max(p[0].shape[1] for p in pairs if p)
        a = torch.stack([F.pad(p[0], (0, rank - p[0].shape[1])) if p else a0.new_zeros(a0.shape[0], rank)
                         for p in pairs])
        b = torch.stack([F.pad(p[1], (0, 0, 0, rank - p[1].shape[0])) if p else b0.new_zeros(rank, b0.shape[1])
                         for p in pairs])
        scale = torch.tensor([p[2] if p else 0.0 for p in pairs], dtype=b.dtype, device=b.device)
        layers.append((module, a, b * scale[:, None, None]))
    return layers


def _hook(a: torch.Tensor, b: torch.Tensor):
    def add_rows(module, args, output):
        x = args[0]
        xa = torch.bmm(x.reshape(a.shape[0], -1, x.shape[-1]).to(a.dtype), a)
        out = output.reshape(a.shape[0], -1, output.shape[-1]).to(a.dtype)  # as peft adds it: in the LoRA dtype
        return torch.baddbmm(out, xa, b).reshape(output.shape).to(output.dtype)

    return add_rows
