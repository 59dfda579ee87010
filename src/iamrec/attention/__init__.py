"""Item-aware attention: mask predicates, layer schedules, installation into transformers models."""

from iamrec.attention.config import ItemAttentionConfig
from iamrec.attention.install import (
    ItemAttentionState,
    apply_item_attention,
    base_model,
    installed_state,
    remove_item_attention,
)
from iamrec.attention.masks import KINDS, dense_mask, full_rule, kind_rule
from iamrec.attention.schedule import PRESETS, ScheduleError, describe, resolve_schedule
from iamrec.segments import CONTEXT, PAD, TARGET

__all__ = [
    "CONTEXT",
    "KINDS",
    "PAD",
    "PRESETS",
    "TARGET",
    "ItemAttentionConfig",
    "ItemAttentionState",
    "ScheduleError",
    "apply_item_attention",
    "base_model",
    "dense_mask",
    "describe",
    "full_rule",
    "installed_state",
    "kind_rule",
    "remove_item_attention",
    "resolve_schedule",
]
