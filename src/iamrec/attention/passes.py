"""Attention passes beyond a decoder layer's own, each with its own KV-cache slot (installed by
`iamrec.attention.install.apply_item_attention`).

- **Stacked passes** (``"intra+inter"``): a pre-hook on the decoder layer keeps its input (the
  residual) and a hook after its ``self_attn`` runs the further passes: ``h1 = h + attn_1(norm(h))``,
  ``attn_2(norm(h1))`` ... and returns the sum, so the layer's own ``residual + out`` equals the
  stacked result. Pass p of layer i writes its keys/values to cache slot ``i + p * N`` — each pass
  has its own keys and values, so cached decoding stays exact.
- **Added sublayers** (``ItemAttentionConfig.added``, the ``added_*`` presets): new modules
  (`AddedItemAttention`, children ``iam_added.<j>`` of the decoder layer, so the layer's own weights and
  names are untouched) run after the layer by a forward hook: ``h = h + attn_j(norm_j(h))`` for each added
  kind in order. Each has its own pre-norm and projections, copied from the layer's (output projection
  zeroed, so at installation the model computes exactly what the pretrained one does), and its own cache
  slot after all stacked slots (``N * max passes`` onwards, in layer order); its attention module is the
  layer's own class, so it goes through the same attention functions, masks and decoders.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    for value in list(kwargs.values()) + list(args):
        if isinstance(value, Cache):
            return value
    return None


def ensure_slot(cache: Cache | None, slot: int) -> None:
    """Give `cache` a layer for `slot` (the model's cache holds only the decoder layers' slots)."""
    if cache is not None and hasattr(cache, "layers"):
        while len(cache.layers) <= slot:
            cache.layers.append(DynamicLayer())


def stacked_hooks(layer: nn.Module, kinds: tuple[str, ...], layer_idx: int, num_layers: int) -> list[Any]:
    """Hooks that turn one decoder layer into ``len(kinds)`` stacked attention passes."""
    attn = layer.self_attn
    if not hasattr(layer, "input_layernorm"):
        raise TypeError(f"{type(layer).__name__} has no input_layernorm; stacked schedules need one.")

    def keep_residual(module, args, kwargs):
        attn._iam_residual = args[0] if args else kwargs["hidden_states"]

    def extra_passes(module, args, kwargs, output):
        # Not popped: with activation checkpointing (transformers >= 5.2x checkpoints `forward`, outside the
        # layer's hooks) the backward replay runs this hook again without re-running `keep_residual`.
        residual = attn.__dict__.get("_iam_residual")
        if kwargs.get("iam_context") is None or residual is None:
            return output  # stock forward: a single causal pass
        out, rest = output[0], output[1:]
        total, hidden = out, residual
        cache = find_cache(args, kwargs)
        try:
            for p in range(1, len(kinds)):
                hidden = hidden + out  # the residual stream after the previous pass
                slot = layer_idx + p * num_layers
                ensure_slot(cache, slot)
                attn.layer_idx = slot  # its own cache slot, and the kind of that slot
                normed = layer.input_layernorm(hidden)
                if args:
                    out = attn.forward(normed, *args[1:], **kwargs)[0]
                else:
                    out = attn.forward(**{**kwargs, "hidden_states": normed})[0]
                total = total + out
        finally:
            attn.layer_idx = layer_idx
        return (total, *rest)

    return [
        layer.register_forward_pre_hook(keep_residual, with_kwargs=True),
        attn.register_forward_hook(extra_passes, with_kwargs=True),
    ]


class AddedItemAttention(GradientCheckpointingLayer):
    """One added item-aware sublayer after a decoder layer: ``h + self_attn(input_layernorm(h))``.

    `self_attn` is a new instance of the layer's attention class with a copy of its weights (LoRA adapters
    of the layer are not copied) and a zero output projection; `input_layernorm` a copy of the layer's
    pre-norm. Its ``layer_idx`` is its own cache slot, whose kind `ItemAttentionState.slot_kind` holds, so
    the registered attention functions and the decoders treat it as one more attention layer. A
    ``GradientCheckpointingLayer``, so activation checkpointing covers it like a decoder layer.
    """

    def __init__(self, layer: nn.Module, layer_idx: int, slot: int, kind: str):
        super().__init__()
        self.kind = kind
        self.self_attn = copy_attention(layer.self_attn, layer_idx)
        self.self_attn.layer_idx = slot
        with torch.no_grad():
            self.self_attn.o_proj.weight.zero_()
            if getattr(self.self_attn.o_proj, "bias", None) is not None:
                self.self_attn.o_proj.bias.zero_()
        self.input_layernorm = copy.deepcopy(layer.input_layernorm)
        for name in ("gradient_checkpointing", "_gradient_checkpointing_func"):  # enabled before installing
            if name in layer.__dict__:
                setattr(self, name, layer.__dict__[name])

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        return hidden_states + out


def copy_attention(attn: nn.Module, layer_idx: int) -> nn.Module:
    """A new module of `attn`'s class holding a copy of its base weights (any peft LoRA layer unwrapped)."""
    state = {
        key.replace(".base_layer.", "."): value.detach().clone()
        for key, value in attn.state_dict().items()
        if "lora_" not in key
    }
    with torch.device("meta"):  # no random initialisation: every weight comes from `state`
        new = type(attn)(attn.config, layer_idx=layer_idx)
    new.load_state_dict(state, assign=True)
    trainable = {
        key.replace(".base_layer.", "."): p.requires_grad
        for key, p in attn.named_parameters()
        if "lora_" not in key
    }
    for key, p in new.named_parameters():
        p.requires_grad_(trainable[key])  # a frozen (LoRA-wrapped) host gives frozen copies
    if any(t.is_meta for t in list(new.parameters()) + list(new.buffers())):
        raise TypeError(f"{type(attn).__name__} has state outside its state_dict; cannot copy it.")
    return new


def added_hook(layer: nn.Module, sublayers: nn.ModuleList) -> Any:
    """A forward hook that runs the added sublayers on the layer's output (item-aware forwards only)."""

    def run_added(module, args, kwargs, output):
        if kwargs.get("iam_context") is None:
            return output  # stock forward
        if len(args) > 1:
            raise TypeError(
                "added sublayers need the decoder layer called as layer(hidden_states, **kwargs)."
            )
        hidden = output[0] if isinstance(output, tuple) else output
        cache = find_cache(args, kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for sub in sublayers:
            ensure_slot(cache, sub.self_attn.layer_idx)
            hidden = sub(hidden, **rest)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return layer.register_forward_hook(run_added, with_kwargs=True)


def adapt_added(model: nn.Module, sublayers: list[nn.Module]) -> None:
    """Under peft LoRA: give the added sublayers the model's adapters (same config, same targets)."""
    import peft

    lora_dtype = next((p.dtype for n, p in model.named_parameters() if "lora_" in n), None)
    for sub in sublayers:
        for adapter, config in model.peft_config.items():
            peft.inject_adapter_in_model(copy.deepcopy(config), sub, adapter_name=adapter)
        if not isinstance(sub.self_attn.o_proj, peft.tuners.tuners_utils.BaseTunerLayer):
            raise ValueError(
                "added item-aware sublayers under LoRA need the output projection among the LoRA target "
                "modules (lora.target_modules must include o_proj): their o_proj starts at zero, and a "
                "frozen zero projection never learns."
            )
        if lora_dtype is not None:
            for name, p in sub.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(lora_dtype)


def remove_added(layers: nn.ModuleList) -> None:
    for layer in layers:
        if "iam_added" in layer._modules:
            del layer.iam_added


def install_added(state: Any, layers: nn.ModuleList) -> list[nn.Module]:
    """Build the added sublayers ``state.added`` (an `ItemAttentionState`) asks for, after every stacked pass's cache slot; record
    each slot's kind and the hooks in `state`. Returns the new sublayers."""
    slot = state.num_layers * max(len(kinds) for kinds in state.schedule)  # after every stacked pass's slot
    new_sublayers = []
    for i, kinds in enumerate(state.added):
        if not kinds:
            continue
        sublayers = nn.ModuleList()
        for kind in kinds:
            sublayers.append(AddedItemAttention(layers[i], i, slot, kind))
            state.slot_kind[slot] = kind
            slot += 1
        layers[i].iam_added = sublayers
        new_sublayers += list(sublayers)
        state.handles.append(added_hook(layers[i], sublayers))
    return new_sublayers
