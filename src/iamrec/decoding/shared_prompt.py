"""Beam decoding with the prompt's keys/values stored once per prompt, not once per beam.

Notation: ``b`` prompts still searching, ``K`` beams, ``R = b * K`` rows, ``Hk`` key/value heads,
``g`` query heads per key/value head (GQA), ``H = Hk * g``, ``D`` head size, ``P`` padded prompt length,
``n`` tokens generated so far (the query is the last of them).

All ``K`` beams of a prompt share its prompt, so its keys/values are the same for every beam. The stock
layout copies them ``K`` times (``batch_repeat_interleave``) and then copies them again at every step
(the beam reorder, the ``cat`` that appends the new token). Here a cache layer keeps

    prompt block     (b, Hk, P, D)    written once by the prefill; only shrinks when prompts settle
    generated block  (R, Hk, n, D)    one row per beam, reordered and grown each step (the first n slots
                                      of a preallocated buffer)

and a decode-step attention function scores the query against both blocks with one softmax:

    scores = [ q·Kp  |  q·Kg ]   (b, Hk, K*g, P + n)   -- the K beams' queries batched against Kp
    probs  = softmax(scores + bias)
    out    = probs[:P]·Vp + probs[P:]·Vg

The bias is the item-aware rule for a TARGET query (generated tokens are TARGET), rendered from
`iamrec.attention.masks.kind_rule` over the key segments ``prompt segments | TARGET * n``, and the prompt's
padding — the same rule and key segments `ItemContext` renders for the stock cache, so the rule is still
written once.

Integration goes through transformers' seams only: `SharedPromptCache` is a `Cache` whose layers return
the generated block from ``update``; `shared_prompt_attention` is registered in ``AttentionInterface``
and switched on for the decode steps only (`decode_attention`); it finds the prompt block through the
``iam_prompt`` keyword that transformers forwards to every attention call. No mask function is registered
under its name, so the model skips building its own mask during those steps (the bias replaces it).
Stacked schedules write pass ``p`` of layer ``i`` to slot ``i + p * N``; the prefill's cache already
holds every slot, and each slot gets its own prompt and generated blocks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from iamrec.attention import base_model, installed_state, kind_rule
from iamrec.segments import TARGET

ATTENTION_NAME = "iam_shared_prompt"


class SharedPromptLayer(DynamicLayer):
    """One cache slot: the prompt block once per prompt, the generated block once per beam.

    The generated block lives in a preallocated ``(R, Hk, capacity, D)`` buffer: a step writes its token
    into the next slot, and the beam reorder copies the filled slots into a spare buffer (one per cache,
    passed from layer to layer) instead of allocating and concatenating every step.
    """

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, capacity: int):
        super().__init__()
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values  # (b, Hk, P, D)
        b, hk, _, d = prompt_keys.shape
        self.capacity = capacity  # most tokens a beam generates
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None  # (R, Hk, capacity, D) keys, values
        self.keys = prompt_keys.new_empty(b, hk, 0, d)  # (R, Hk, n, D) views of the buffer's filled slots
        self.values = prompt_values.new_empty(b, hk, 0, d)
        self.device = prompt_keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write one token per beam into the next slot; returns the generated block (the attention adds the prompt)."""
        r, n = key_states.shape[0], self.keys.shape[-2]
        if n == self.capacity:
            raise RuntimeError(
                f"the decode cache holds {self.capacity} generated tokens; a beam asked for more."
            )
        if self.buffer is None:
            shape = (r, *key_states.shape[1:2], self.capacity, key_states.shape[-1])
            self.buffer = (key_states.new_empty(shape), value_states.new_empty(shape))
        keys, values = self.buffer[0][:r], self.buffer[1][:r]
        keys[:, :, n : n + 1] = key_states
        values[:, :, n : n + 1] = value_states
        self.keys, self.values = keys[:, :, : n + 1], values[:, :, : n + 1]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def select(
        self,
        prompts: torch.Tensor | None,
        rows: torch.Tensor,
        spare: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep prompts ``prompts`` (None: all) and beam rows ``rows`` (indices into the current rows).

        The filled slots are copied into `spare` (a buffer of this layer's shape, or None: allocate one);
        returns this layer's previous buffer, the spare for the next layer.
        """
        if prompts is not None:
            self.prompt_keys = self.prompt_keys.index_select(0, prompts)
            self.prompt_values = self.prompt_values.index_select(0, prompts)
        n = self.keys.shape[-2]
        if n == 0:
            return spare
        spare = spare or (torch.empty_like(self.buffer[0]), torch.empty_like(self.buffer[1]))
        r = rows.numel()
        keys, values = spare[0][:r, :, :n], spare[1][:r, :, :n]
        torch.index_select(self.keys, 0, rows, out=keys)
        torch.index_select(self.values, 0, rows, out=values)
        self.buffer, spare = spare, self.buffer
        self.keys, self.values = keys, values
        return spare


class SharedPromptCache(Cache):
    """A `Cache` of `SharedPromptLayer` slots, built from the prefill's `DynamicCache`.

    ``capacity``: the most tokens a beam generates (the size of each slot's generated buffer). A slot the
    prefill left empty (a schedule that stacks passes in some layers only leaves such gaps: pass p of
    layer i writes slot ``i + p * N``) stays an empty `DynamicLayer`: no attention reads or writes it.
    """

    def __init__(self, prefill_cache: Cache, capacity: int):
        layers = [
            SharedPromptLayer(layer.keys, layer.values, capacity)
            if layer.keys is not None
            else DynamicLayer()
            for layer in prefill_cache.layers
        ]
        super().__init__(layers=layers)
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, prompts: torch.Tensor | None, rows: torch.Tensor) -> None:
        for layer in self.layers:  # each layer's old buffer becomes the next layer's spare
            if isinstance(layer, SharedPromptLayer):
                self._spare = layer.select(prompts, rows, self._spare)


class SharedPrompt:
    """What a decode step's attention needs besides q/k/v; travels as the ``iam_prompt`` keyword.

    Args:
        cache: the decode cache (its slots hold the prompt blocks).
        beams: ``K``.
        prompt_mask: ``(b, P)`` 1 for prompt tokens, 0 for left padding, or None (no padding).
        prompt_segments: ``(b, P)`` prompt segment ids, or None (stock attention: every layer causal).
        slot_kind: cache slot -> kind (``ItemAttentionState.slot_kind``); unused without segments.
        context_visible: the installation's ``context_visible``.
        generated: ``n``, tokens generated including the one this step feeds.
    """

    def __init__(
        self,
        cache: SharedPromptCache,
        beams: int,
        prompt_mask: torch.Tensor | None,
        prompt_segments: torch.Tensor | None,
        slot_kind: dict[int, str],
        context_visible: bool,
        generated: int,
    ):
        self.cache, self.beams, self.generated = cache, beams, generated
        self.prompt_mask, self.prompt_segments = prompt_mask, prompt_segments
        self.slot_kind, self.context_visible = slot_kind, context_visible
        self._bias: dict[str, torch.Tensor] = {}

    def kind(self, slot: int) -> str:
        return "causal" if self.prompt_segments is None else self.slot_kind[slot]

    def bias(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        """``(b, 1, 1, P + n)`` additive bias (0 or -inf) for a TARGET query, memoised per kind."""
        if kind not in self._bias:
            layer = self.cache.layers[0]
            b, p = layer.prompt_keys.shape[0], layer.prompt_keys.shape[-2]
            n, device = self.generated, like.device
            allowed = torch.ones(b, p + n, dtype=torch.bool, device=device)
            if self.prompt_mask is not None:
                allowed[:, :p] = self.prompt_mask.to(device=device, dtype=torch.bool)
            if kind != "causal":
                seg = self.prompt_segments.to(device).long()
                seg = torch.cat([seg, seg.new_full((b, n), TARGET)], dim=1)  # (b, P + n)
                pos = torch.arange(p + n, device=device)
                allowed &= kind_rule(
                    kind, torch.full_like(seg, TARGET), seg, pos[-1], pos, self.context_visible
                )
            bias = torch.zeros(b, p + n, dtype=like.dtype, device=device)
            self._bias[kind] = bias.masked_fill_(~allowed, float("-inf"))[:, None, None, :]
        return self._bias[kind]


def shared_prompt_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    iam_prompt: SharedPrompt | None = None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One decode step: ``query (R, H, 1, D)`` against the prompt block and the generated ``key (R, Hk, n, D)``.

    Returns ``(R, 1, H, D)`` like the stock functions. Only used between `decode_attention`'s enter and exit.
    """
    if iam_prompt is None:
        raise RuntimeError(f"the '{ATTENTION_NAME}' attention runs only inside constrained_beam_search.")
    layer = iam_prompt.cache.layers[module.layer_idx]
    pk, pv = layer.prompt_keys, layer.prompt_values  # (b, Hk, P, D)
    b, hk, p, d = pk.shape
    r, h, _, _ = query.shape
    k, n, g = r // b, key.shape[-2], h // hk
    scale = d**-0.5 if scaling is None else scaling
    q = query.view(b, k, hk, g, d)  # beam-major rows, head h uses key/value head h // g
    qp = q.permute(0, 2, 1, 3, 4).reshape(b, hk, k * g, d)  # every beam's query against its prompt's keys
    s_prompt = torch.matmul(qp, pk.transpose(-1, -2))  # (b, Hk, K*g, P)
    s_gen = torch.matmul(q, key.view(b, k, hk, n, d).transpose(-1, -2))  # (b, K, Hk, g, n)
    s_gen = s_gen.permute(0, 2, 1, 3, 4).reshape(b, hk, k * g, n)
    scores = torch.cat([s_prompt, s_gen], dim=-1).mul_(scale)
    scores += iam_prompt.bias(iam_prompt.kind(module.layer_idx), scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)  # (b, Hk, K*g, P + n)
    out = torch.matmul(probs[..., :p], pv).view(b, hk, k, g, d).permute(0, 2, 1, 3, 4)  # (b, K, Hk, g, D)
    p_gen = probs[..., p:].reshape(b, hk, k, g, n).permute(0, 2, 1, 3, 4)  # (b, K, Hk, g, n)
    out = out + torch.matmul(p_gen, value.view(b, k, hk, n, d))
    return out.reshape(r, 1, h, d), None


@contextlib.contextmanager
def decode_attention(model: nn.Module):
    """Switch the model to `shared_prompt_attention` for the decode steps, restoring its own afterwards.

    Through the config's ``_attn_implementation`` setter (it sets the sub-configs too), not the model's
    public ``set_attn_implementation`` that `apply_item_attention` uses once: that walks every module
    on each call, and this switch runs twice per decode step (measured: 8 ms per step on a LoRA-wrapped
    30-layer tiny model on CPU, 11% of the whole search, against 0.1-0.2 ms here).
    """
    AttentionInterface.register(ATTENTION_NAME, shared_prompt_attention)
    config = base_model(model).config
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = saved


def item_state(model: nn.Module) -> tuple[dict[int, str], bool]:
    """``(slot -> kind, context_visible)`` of the installed item-aware attention (empty, True if none)."""
    state = installed_state(model)
    return ({}, True) if state is None else (state.slot_kind, state.context_visible)
