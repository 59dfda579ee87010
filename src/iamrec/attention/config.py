"""`ItemAttentionConfig`: the item-aware attention settings, declared (and documented) once.

Used by `apply_item_attention` (Python API: a config, a schedule, or the settings by name, see
`attention_config`), `iamrec.model.build_model` and the LightningModule, where LightningCLI exposes it as
the nested keys ``model.attention.schedule``, ``model.attention.backend``, ... Frozen, so one instance can
serve as a default value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from iamrec.attention.schedule import ADDED_PRESETS, PRESETS, unknown_preset

Backend = Literal["sdpa", "eager", "flex"]
BACKENDS: tuple[str, ...] = ("sdpa", "eager", "flex")


@dataclass(frozen=True)
class ItemAttentionConfig:
    """Which attention kind each decoder layer runs, and how it is computed.

    Args:
        schedule: Preset (``causal``, ``iam``, ``iam_inter_first``, ``split``, ``split_inter_first``,
            ``stacked``, ``stacked_inter_first``, ``intra_only``, ``inter_only``, ``hatllm``; the added-layer
            presets ``added_iam``, ``added_inter_first``, ``added_top``, ``added_alternate``,
            ``added_causal``) or one entry per decoder layer (kinds joined by ``+`` for stacked passes in
            one layer).
        backend: Attention kernel: ``sdpa`` (default), ``eager`` (reference) or ``flex`` (FlexAttention,
            GPU for training).
        context_visible: Every query may also see the CONTEXT tokens (instruction, response header).
        split_at: Layer at which ``split`` schedules switch kinds (default: half the layers).
        hatllm_bands: (intra layers, inter layers) of the ``hatllm`` preset (default: a third each).
        added: Added item-aware sublayers, one entry per decoder layer: the kinds run after that layer, in
            order, joined by ``+`` (``"intra+inter"``), or ``""`` for none. Each added sublayer
            ``h + attn(norm(h))`` has its own pre-norm, projections (copied from the layer's attention,
            output projection zeroed: the model starts exactly as the pretrained one, bit for bit), residual
            and KV-cache slot, and runs only when ``segment_ids`` are given. ``None`` (default): none, or
            what an ``added_*`` schedule preset chooses (``added_top`` adds them from layer ``split_at``,
            default half the layers, upwards). Training: with full fine-tuning every new weight trains; on
            a peft LoRA model the sublayers get the model's LoRA adapters (same config; their base weights
            stay frozen like the layer's), so ``target_modules`` must include ``o_proj``. Installing before
            ``get_peft_model`` works too (the sublayers' projections carry the layers' names, so peft's
            targets reach them). Re-installing rebuilds the sublayers (their trained weights are dropped).
    """

    schedule: str | list[str] = "iam"
    backend: Backend = "sdpa"
    context_visible: bool = True
    split_at: int | None = None
    hatllm_bands: tuple[int, int] | None = None
    added: list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "attention") -> None:
        """The checks that need no backbone; the schedule against the layer count is checked on install."""
        if self.backend not in BACKENDS:
            raise ValueError(f"{key}.backend='{self.backend}' is not one of {', '.join(BACKENDS)}.")
        if isinstance(self.schedule, str) and self.schedule not in PRESETS:
            raise unknown_preset(self.schedule, f"{key}.schedule")
        if self.added is not None and isinstance(self.schedule, str) and self.schedule in ADDED_PRESETS:
            raise ValueError(
                f"{key}.added is set but {key}.schedule='{self.schedule}' already chooses the added sublayers; "
                f"give one of them (e.g. {key}.schedule=causal with {key}.added)."
            )


SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ItemAttentionConfig))


def attention_config(
    config: ItemAttentionConfig | str | list[str] | None = None, *positional: Any, **settings: Any
) -> ItemAttentionConfig:
    """The settings `apply_item_attention` installs: `config` (an `ItemAttentionConfig`, or a schedule —
    a preset name or one entry per decoder layer — as ``ItemAttentionConfig(schedule=...)``; None: the
    defaults), with the settings given after it applied over it: positionally in `ItemAttentionConfig`'s
    field order (after a schedule: backend, context_visible, ...) or by name. A name that is no field is a
    TypeError listing the fields."""
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        raise TypeError(
            f"{unknown[0]!r} is not an item-attention setting; the settings are ItemAttentionConfig's "
            f"fields: {', '.join(SETTINGS)}."
        )
    if isinstance(config, ItemAttentionConfig):
        if positional:
            raise TypeError(
                "settings given with an ItemAttentionConfig must be named (e.g. backend='eager')."
            )
        return dataclasses.replace(config, **settings) if settings else config
    given = () if config is None and not positional else (config, *positional)
    if len(given) > len(SETTINGS):
        raise TypeError(
            f"{len(given)} positional settings given; there are {len(SETTINGS)}: {', '.join(SETTINGS)}."
        )
    named = dict(zip(SETTINGS, given))
    twice = [name for name in settings if name in named]
    if twice:
        raise TypeError(f"the setting {twice[0]!r} is given both by position and by name.")
    return ItemAttentionConfig(**named, **settings)
