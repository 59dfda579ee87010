"""`ItemAttentionConfig`: the item-aware attention settings, declared once.

Used by `apply_item_attention` (Python API), `iamrec.model.build_model` and the LightningModule, where
LightningCLI exposes it as the nested keys ``model.attention.schedule``, ``model.attention.backend``, ...
Frozen, so one instance can serve as a default value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
            order, joined by ``+`` (``"intra+inter"``), or ``""`` for none. Each added sublayer has its own
            pre-norm, projections (copied from the layer's attention, output projection zeroed: the model
            starts exactly as the pretrained one), residual and KV-cache slot; see `apply_item_attention`.
            ``None`` (default): none, or what an ``added_*`` schedule preset chooses (``added_top`` adds
            them from layer ``split_at``, default half the layers, upwards).
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
