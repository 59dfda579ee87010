"""Install item-aware attention into a transformers causal LM through its public seams.

Nothing in transformers is forked. Four small pieces, each at one seam:

1. **Attention functions** ``iam_sdpa`` / ``iam_eager`` / ``iam_flex`` registered in
   ``AttentionInterface`` (and the stock mask builders under the same names in
   ``AttentionMaskInterface``, so the model keeps building its own causal + padding mask in the
   backend's format). Each wraps the stock kernel: without an item context it is the stock kernel;
   with one it looks up the kind of ``module.layer_idx`` and intersects the model's mask with that
   kind's rule (``masks.kind_rule``).
2. **A forward pre-hook on the decoder stack** (e.g. ``LlamaModel``) that turns the user's
   ``segment_ids=`` into an ``iam_context`` keyword. transformers forwards unknown keywords down to
   every attention call, so the context reaches each layer; it memoises one mask per kind, so each
   distinct kind is built once per forward, not once per layer.
3. **Stacked passes** (``"intra+inter"``): a pre-hook on the decoder layer keeps its input (the
   residual) and a hook after its ``self_attn`` runs the further passes: ``h1 = h + attn_1(norm(h))``,
   ``attn_2(norm(h1))`` ... and returns the sum, so the layer's own ``residual + out`` equals the
   stacked result. Pass p of layer i writes its keys/values to cache slot ``i + p * N`` — each pass
   has its own keys and values, so cached decoding stays exact.
4. **Added sublayers** (``ItemAttentionConfig.added``, the ``added_*`` presets): new modules
   (`AddedItemAttention`, children ``iam_added.<j>`` of the decoder layer, so the layer's own weights and
   names are untouched) run after the layer by a forward hook: ``h = h + attn_j(norm_j(h))`` for each added
   kind in order. Each has its own pre-norm and projections, copied from the layer's (output projection
   zeroed, so at installation the model computes exactly what the pretrained one does), and its own cache
   slot after all stacked slots (``N * max passes`` onwards, in layer order); its attention module is the
   layer's own class, so it goes through the same attention functions, masks and decoders.
5. **generate()** accepts ``segment_ids`` (its kwarg validation is told to let it through); generated
   tokens are TARGET because the context pads the prompt's segment ids with TARGET up to the cache
   length.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from iamrec.attention.config import Backend, ItemAttentionConfig
from iamrec.attention.masks import kind_rule, segment_mask_mod
from iamrec.attention.schedule import (
    ADDED_PRESETS,
    Schedule,
    added_preset_entries,
    resolve_added,
    resolve_schedule,
)
from iamrec.segments import TARGET

_STOCK_NAME = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention"}


@dataclass
class ItemAttentionState:
    """What `apply_item_attention` installed (read it with `installed_state(model)`)."""

    schedule: Schedule
    backend: str
    context_visible: bool
    num_layers: int
    slot_kind: dict[int, str] = field(default_factory=dict)  # cache slot -> kind
    handles: list[Any] = field(default_factory=list)  # hook handles, removed on re-install
    added: list[tuple[str, ...]] = field(default_factory=list)  # per layer: added sublayer kinds, in order


class ItemContext:
    """Per-forward item information; travels to every attention call as the ``iam_context`` keyword."""

    def __init__(self, segment_ids: torch.Tensor, state: ItemAttentionState):
        if segment_ids.dim() != 2:
            raise ValueError(f"segment_ids must be (batch, length); got shape {tuple(segment_ids.shape)}.")
        self.segment_ids = segment_ids.long()
        self.state = state
        self._masks: dict[tuple, Any] = {}

    def kind_of(self, slot: int) -> str:
        return self.state.slot_kind[slot]

    def key_segments(self, kv_len: int) -> torch.Tensor:
        """``(B, K)`` segment ids of every key: the given ones, then TARGET for generated tokens."""
        seg = self.segment_ids
        if seg.shape[1] > kv_len:
            raise ValueError(
                f"segment_ids cover {seg.shape[1]} positions but the attention sees only {kv_len} keys; "
                "give segment ids for the prompt (and cached tokens), not beyond."
            )
        if seg.shape[1] < kv_len:
            seg = torch.cat([seg, seg.new_full((seg.shape[0], kv_len - seg.shape[1]), TARGET)], dim=1)
        return seg

    def mask(self, kind: str, base_mask: Any, query: torch.Tensor, key: torch.Tensor) -> Any:
        """The model's own mask for this call intersected with `kind`'s rule, memoised per forward."""
        q_len, kv_len = query.shape[-2], key.shape[-2]
        memo = (kind, q_len, kv_len)
        if memo not in self._masks:
            self._masks[memo] = self._render(kind, base_mask, query, q_len, kv_len)
        return self._masks[memo]

    def _render(self, kind: str, base_mask: Any, query: torch.Tensor, q_len: int, kv_len: int) -> Any:
        seg = self.key_segments(kv_len).to(query.device)  # (B, K)
        if seg.shape[0] != query.shape[0]:
            raise ValueError(
                f"segment_ids has batch {seg.shape[0]} but the inputs have batch {query.shape[0]}."
            )
        q_offset = kv_len - q_len  # cached decoding: the queries are the last q_len positions
        cv = self.state.context_visible
        if self.state.backend == "flex":
            from torch.nn.attention.flex_attention import and_masks, create_block_mask

            mods = [segment_mask_mod(kind, seg, cv, q_offset)]
            if base_mask is not None:
                mods.insert(0, base_mask.mask_mod)
            else:
                mods.insert(0, lambda b, h, q, k: k <= q + q_offset)
            return create_block_mask(and_masks(*mods), seg.shape[0], None, q_len, kv_len, device=query.device)
        k = torch.arange(kv_len, device=query.device)
        q = k[q_offset:]
        allowed = kind_rule(  # (B, 1, Q, K)
            kind,
            seg[:, None, q_offset:, None],
            seg[:, None, None, :],
            q[None, None, :, None],
            k[None, None, None, :],
            cv,
        )
        if base_mask is None:  # the model skipped its mask (no padding): causal is implied
            allowed = allowed & (k[None, None, None, :] <= q[None, None, :, None])
            if self.state.backend == "sdpa":
                return allowed
            base_mask = torch.zeros((), dtype=query.dtype, device=query.device)
        base_mask = base_mask[..., -q_len:, :kv_len]
        if base_mask.dtype == torch.bool:  # sdpa's format: True = attend
            return base_mask & allowed
        # eager's format: an additive float mask; keep it float (a bool mask there is silently wrong)
        return base_mask.masked_fill(~allowed, torch.finfo(base_mask.dtype).min)


def _stock_attention(backend: str, module: nn.Module):
    if backend == "eager":  # each family has its own eager function in its modeling module
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[_STOCK_NAME[backend]]


def _make_attention_function(backend: str):
    def attention(
        module, query, key, value, attention_mask, iam_context: ItemContext | None = None, **kwargs
    ):
        stock = _stock_attention(backend, module)
        if iam_context is not None:
            kind = iam_context.kind_of(module.layer_idx)
            if kind != "causal":
                attention_mask = iam_context.mask(kind, attention_mask, query, key)
        return stock(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"iam_{backend}_attention"
    return attention


def register_backends() -> None:
    """Register ``iam_sdpa``/``iam_eager``/``iam_flex`` (idempotent)."""
    for backend, stock in _STOCK_NAME.items():
        name = f"iam_{backend}"
        AttentionInterface.register(name, _make_attention_function(backend))
        if stock in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[stock])


def base_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a (possibly peft-wrapped) model; a TypeError for anything else."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"item-aware attention needs a transformers causal LM, got {type(model).__name__}.")
    return model


def installed_state(model: nn.Module) -> ItemAttentionState | None:
    """What `apply_item_attention` installed in `model` (peft-wrapped or not), or None if nothing is."""
    return getattr(base_model(model), "_iam_state", None)


def _decoder_layers(hf: PreTrainedModel) -> tuple[nn.Module, nn.ModuleList]:
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.base_model
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(
            f"{type(hf).__name__} has no `layers[i].self_attn` decoder stack; iamrec supports Llama-style "
            "decoders (Llama, Qwen2, Qwen3, Mistral, ...)."
        )
    return decoder, layers


def _find_cache(args: tuple, kwargs: dict) -> Cache | None:
    for value in list(kwargs.values()) + list(args):
        if isinstance(value, Cache):
            return value
    return None


def _ensure_slot(cache: Cache | None, slot: int) -> None:
    """Give `cache` a layer for `slot` (the model's cache holds only the decoder layers' slots)."""
    if cache is not None and hasattr(cache, "layers"):
        while len(cache.layers) <= slot:
            cache.layers.append(DynamicLayer())


def _stacked_hooks(layer: nn.Module, kinds: tuple[str, ...], layer_idx: int, num_layers: int) -> list[Any]:
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
        cache = _find_cache(args, kwargs)
        try:
            for p in range(1, len(kinds)):
                hidden = hidden + out  # the residual stream after the previous pass
                slot = layer_idx + p * num_layers
                _ensure_slot(cache, slot)
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
        self.self_attn = _copy_attention(layer.self_attn, layer_idx)
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


def _copy_attention(attn: nn.Module, layer_idx: int) -> nn.Module:
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


def _added_hook(layer: nn.Module, sublayers: nn.ModuleList) -> Any:
    """A forward hook that runs the added sublayers on the layer's output (item-aware forwards only)."""

    def run_added(module, args, kwargs, output):
        if kwargs.get("iam_context") is None:
            return output  # stock forward
        if len(args) > 1:
            raise TypeError(
                "added sublayers need the decoder layer called as layer(hidden_states, **kwargs)."
            )
        hidden = output[0] if isinstance(output, tuple) else output
        cache = _find_cache(args, kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for sub in sublayers:
            _ensure_slot(cache, sub.self_attn.layer_idx)
            hidden = sub(hidden, **rest)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return layer.register_forward_hook(run_added, with_kwargs=True)


def _adapt_added(model: nn.Module, sublayers: list[nn.Module]) -> None:
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


def _remove_added(layers: nn.ModuleList) -> None:
    for layer in layers:
        if "iam_added" in layer._modules:
            del layer.iam_added


def apply_item_attention(
    model: nn.Module,
    schedule: str | list[str] = "iam",
    backend: Backend = "sdpa",
    context_visible: bool = True,
    split_at: int | None = None,
    hatllm_bands: tuple[int, int] | None = None,
    added: list[str] | None = None,
    *,
    config: ItemAttentionConfig | None = None,
    config_key: str = "schedule",
) -> nn.Module:
    """Install item-aware attention into a transformers causal LM (or a peft model wrapping one).

    Afterwards ``model(input_ids=..., attention_mask=..., segment_ids=...)`` and
    ``model.generate(..., segment_ids=...)`` attend item-aware following `schedule`; without
    ``segment_ids`` the model is stock. Calling it again replaces the previous installation.

    Args:
        model: a transformers causal LM with a Llama-style decoder stack, possibly peft-wrapped.
        schedule: a preset name (see ``iamrec.attention.PRESETS``) or one entry per decoder layer.
        backend: ``sdpa`` (default), ``eager`` (reference) or ``flex`` (FlexAttention, GPU for training).
        context_visible: every query may also see CONTEXT keys (instruction, response header).
        split_at: layer where ``split``/``split_inter_first`` switch kinds (default: half).
        hatllm_bands: (intra layers, inter layers) of the ``hatllm`` preset (default: a third each).
        added: added item-aware sublayers, one entry per decoder layer (kinds joined by ``+``, run after
            that layer in order; ``""`` for none), or None (none, or what an ``added_*`` preset chooses).
            Each sublayer ``h + attn(norm(h))`` has its own pre-norm, projections (copied from the layer's,
            output projection zero: the model starts as the pretrained one, bit for bit), residual and
            KV-cache slot, and runs only when ``segment_ids`` are given. Training: with full fine-tuning
            every new weight trains; on a peft LoRA model the sublayers get the model's LoRA adapters
            (same config; their base weights stay frozen like the layer's), so ``target_modules`` must
            include ``o_proj``. Installing before ``get_peft_model`` works too (the sublayers' projections
            carry the layers' names, so peft's targets reach them). Re-installing rebuilds the sublayers
            (their trained weights are dropped).
        config: all of the settings above as one `ItemAttentionConfig`; when given, it replaces them.
        config_key: how errors name the schedule (e.g. ``model.attention.schedule`` from a config).
    """
    if config is None:
        config = ItemAttentionConfig(schedule, backend, context_visible, split_at, hatllm_bands, added)
    schedule, backend, context_visible = config.schedule, config.backend, config.context_visible
    register_backends()
    hf = base_model(model)
    decoder, layers = _decoder_layers(hf)
    num_layers = len(layers)
    resolved = resolve_schedule(schedule, num_layers, config.split_at, config.hatllm_bands, key=config_key)
    added_key = config_key.removesuffix("schedule") + "added"
    if config.added is not None:
        added_kinds = resolve_added(config.added, num_layers, key=added_key)
    elif isinstance(schedule, str) and schedule in ADDED_PRESETS:
        added_kinds = resolve_added(
            added_preset_entries(schedule, num_layers, config.split_at, config_key), num_layers
        )
    else:
        added_kinds = [()] * num_layers
    old = getattr(hf, "_iam_state", None)
    if old is not None:
        for handle in old.handles:
            handle.remove()
    _remove_added(layers)
    state = ItemAttentionState(resolved, backend, context_visible, num_layers, added=added_kinds)
    for i, kinds in enumerate(resolved):
        if getattr(layers[i].self_attn, "layer_idx", i) != i:
            raise TypeError(
                f"decoder layer {i} has self_attn.layer_idx={layers[i].self_attn.layer_idx}; expected {i}."
            )
        for p, kind in enumerate(kinds):
            state.slot_kind[i + p * num_layers] = kind
        if len(kinds) > 1:
            state.handles += _stacked_hooks(layers[i], kinds, i, num_layers)
    slot = num_layers * max(len(kinds) for kinds in resolved)  # after every stacked pass's slot
    new_sublayers = []
    for i, kinds in enumerate(added_kinds):
        if not kinds:
            continue
        sublayers = nn.ModuleList()
        for kind in kinds:
            sublayers.append(AddedItemAttention(layers[i], i, slot, kind))
            state.slot_kind[slot] = kind
            slot += 1
        layers[i].iam_added = sublayers
        new_sublayers += list(sublayers)
        state.handles.append(_added_hook(layers[i], sublayers))
    if new_sublayers and hasattr(model, "peft_config"):
        _adapt_added(model, new_sublayers)

    def to_context(module, args, kwargs):
        segment_ids = kwargs.pop("segment_ids", None)
        if segment_ids is None:
            return None
        kwargs["iam_context"] = ItemContext(segment_ids, state)
        return args, kwargs

    state.handles.append(decoder.register_forward_pre_hook(to_context, with_kwargs=True))
    _set_attention(hf, f"iam_{backend}")
    _allow_generate_kwarg(hf, "segment_ids")
    hf._iam_state = state
    return model


def _set_attention(hf: PreTrainedModel, name: str) -> None:
    try:
        hf.set_attn_implementation(name)
    except (ValueError, AttributeError):  # older releases validate the name strictly
        hf.config._attn_implementation = name


def _allow_generate_kwarg(hf: PreTrainedModel, name: str) -> None:
    """Let ``generate(segment_ids=...)`` through the kwarg validation of this instance only."""
    if getattr(hf, "_iam_validate_wrapped", False):
        return
    validate = hf._validate_model_kwargs

    def validate_model_kwargs(model_kwargs):
        return validate({k: v for k, v in model_kwargs.items() if k != name})

    hf._validate_model_kwargs = validate_model_kwargs
    hf._iam_validate_wrapped = True


def remove_item_attention(model: nn.Module, attn_implementation: str | None = None) -> nn.Module:
    """Undo `apply_item_attention` (hooks and added sublayers removed, stock attention restored)."""
    hf = base_model(model)
    state = getattr(hf, "_iam_state", None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        _set_attention(hf, attn_implementation or _STOCK_NAME[state.backend])
        _remove_added(_decoder_layers(hf)[1])
        del hf._iam_state
    return model
