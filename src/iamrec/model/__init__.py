"""Backbones: loading (hub id, local folder, tiny random config), LoRA and building. Never imports Lightning."""

from iamrec.model.build import LoraConfig, add_lora, build_model
from iamrec.model.export import export_model, load_exported
from iamrec.model.loading import (
    BackboneError,
    hub_reachable,
    load_backbone,
    load_backbone_config,
    load_tokenizer,
    looks_like_hub_id,
)
from iamrec.model.sharding import decoder_layer_classes

__all__ = [
    "BackboneError",
    "LoraConfig",
    "add_lora",
    "build_model",
    "decoder_layer_classes",
    "export_model",
    "hub_reachable",
    "load_exported",
    "load_backbone",
    "load_backbone_config",
    "load_tokenizer",
    "looks_like_hub_id",
]
