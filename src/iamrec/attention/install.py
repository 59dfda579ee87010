"""Install item-aware attention into a transformers causal LM through its public seams.

Nothing in transformers is forked. The pieces, each at one seam:

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
3. **Stacked passes** (``"intra+inter"``) and 4. **added sublayers** (``ItemAttentionConfig.added``): more
   attention passes around a decoder layer, each with its own KV-cache slot (`iamrec.attention.passes`).
5. **generate()** accepts ``segment_ids`` (its kwarg validation is told to let it through); generated
   tokens are TARGET because the context pads the prompt's segment ids with TARGET up to the cache
   length.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from iamrec.attention.config import ItemAttentionConfig, attention_config
from iamrec.attention.masks import kind_rule, segment_mask_mod
from iamrec.attention.passes import adapt_added, install_added, remove_added, stacked_hooks
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


def apply_item_attention(
    model: nn.Module,
    config: ItemAttentionConfig | str | list[str] | None = None,
    *positional: Any,
    config_key: str = "schedule",
    **settings: Any,
) -> nn.Module:
    """Install item-aware attention into a transformers causal LM (or a peft model wrapping one).

    Afterwards ``model(input_ids=..., attention_mask=..., segment_ids=...)`` and
    ``model.generate(..., segment_ids=...)`` attend item-aware following the schedule; without
    ``segment_ids`` the model is stock. Calling it again replaces the previous installation.

    Args:
        model: a transformers causal LM with a Llama-style decoder stack, possibly peft-wrapped.
        config: an `ItemAttentionConfig`, or a schedule (a preset name or one entry per decoder layer);
            None: the defaults.
        *positional, **settings: `ItemAttentionConfig`'s settings (each documented there, nowhere else),
            applied over `config`: after a schedule positionally in field order, or by name, e.g.
            ``apply_item_attention(model, schedule="iam", backend="sdpa", context_visible=True)``.
        config_key: how errors name the schedule (e.g. ``model.attention.schedule`` from a config).
    """
    config = attention_config(config, *positional, **settings)
    register_backends()
    hf = base_model(model)
    decoder, layers = _decoder_layers(hf)
    resolved, added_kinds = _resolve(config, len(layers), config_key)
    old = getattr(hf, "_iam_state", None)
    if old is not None:
        for handle in old.handles:
            handle.remove()
    remove_added(layers)
    state = ItemAttentionState(
        resolved, config.backend, config.context_visible, len(layers), added=added_kinds
    )
    _install_passes(state, layers)
    new_sublayers = install_added(state, layers)
    if new_sublayers and hasattr(model, "peft_config"):
        adapt_added(model, new_sublayers)
    state.handles.append(decoder.register_forward_pre_hook(_context_hook(state), with_kwargs=True))
    _set_attention(hf, f"iam_{config.backend}")
    _allow_generate_kwarg(hf, "segment_ids")
    hf._iam_state = state
    return model


def _resolve(
    config: ItemAttentionConfig, num_layers: int, config_key: str
) -> tuple[Schedule, list[tuple[str, ...]]]:
    """Per decoder layer: the kinds of its passes, and those of its added sublayers (errors name
    `config_key`, and its ``added`` sibling)."""
    schedule = config.schedule
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
    return resolved, added_kinds


def _install_passes(state: ItemAttentionState, layers: nn.ModuleList) -> None:
    """Each decoder layer's own passes: the kind of each cache slot, and the hooks of stacked layers."""
    num_layers = state.num_layers
    for i, kinds in enumerate(state.schedule):
        if getattr(layers[i].self_attn, "layer_idx", i) != i:
            raise TypeError(
                f"decoder layer {i} has self_attn.layer_idx={layers[i].self_attn.layer_idx}; expected {i}."
            )
        for p, kind in enumerate(kinds):
            state.slot_kind[i + p * num_layers] = kind
        if len(kinds) > 1:
            state.handles += stacked_hooks(layers[i], kinds, i, num_layers)


def _context_hook(state: ItemAttentionState):
    """The decoder stack's pre-hook: ``segment_ids=`` becomes the ``iam_context`` every attention call gets."""

    def to_context(module, args, kwargs):
        segment_ids = kwargs.pop("segment_ids", None)
        if segment_ids is None:
            return None
        kwargs["iam_context"] = ItemContext(segment_ids, state)
        return args, kwargs

    return to_context


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
        remove_added(_decoder_layers(hf)[1])
        del hf._iam_state
    return model
