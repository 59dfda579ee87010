"""Backbones: loading (hub id, local folder, tiny random config), LoRA and building. Never imports Lightning."""

from iamrec.model.build import LoraConfig, add_lora, build_model
from iamrec.model.export import export_model, load_exported
from iamrec.model.loading import (
    BackboneError,
    hub_reachable,
    load_backbone,
    load_tokenizer,
    looks_like_hub_id,
)

__all__ = [
    "BackboneError",
    "LoraConfig",
    "add_lora",
    "build_model",
    "export_model",
    "hub_reachable",
    "load_exported",
    "load_backbone",
    "load_tokenizer",
    "looks_like_hub_id",
]
