"""Build the model a run trains: backbone -> (LoRA adapters) -> item-aware attention.

Plain PyTorch / transformers / peft; no Lightning import, so scripts and notebooks build exactly the model
the LightningModule trains: ``build_model(backbone, ItemAttentionConfig("iam"), LoraConfig(r=16))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from iamrec.attention import ItemAttentionConfig, apply_item_attention
from iamrec.model.loading import load_backbone

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (peft) on the attention projections; ``None`` instead of this means full fine-tuning.

    Args:
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the LoRA path.
        target_modules: Modules that get adapters (HF module names, so peft finds them).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r={self.r} must be >= 1 (use `lora: null` for full fine-tuning).")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout} must lie in [0, 1).")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name at least one module (e.g. q_proj).")


def add_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap `model` in peft LoRA adapters; the adapters are fp32 even on a bf16 base."""
    import peft

    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    model = peft.get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def build_model(
    backbone: str,
    attention: ItemAttentionConfig,
    lora: LoraConfig | None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    gradient_checkpointing: bool = False,
    config_key: str = "model.attention",
) -> nn.Module:
    """Backbone (see `iamrec.model.loading`) -> LoRA (unless `lora` is None) -> item-aware attention.

    `config_key` is how errors name the attention settings (``model.attention`` in the CLI).
    """
    attn_implementation = "eager" if attention.backend == "eager" else "sdpa"
    model = load_backbone(backbone, dtype=dtype, attn_implementation=attn_implementation)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        model = add_lora(model, lora)
    return apply_item_attention(model, config=attention, config_key=f"{config_key}.schedule")
