"""Which modules of a backbone are FSDP units: its decoder layers, one unit each.

Sharding per decoder layer lets FSDP gather one layer's weights at a time (forward and backward), so the
peak memory is one layer's full weights plus every layer's shard; wrapping only the root would gather the
whole model at once. The class is the backbone's own: transformers names it in the model class's
``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``Qwen3DecoderLayer``,
``MistralDecoderLayer``, ...), read from the config alone (no weights), and for a built model it is the
class of ``layers[i]``. peft (LoRA) and item-aware attention keep these classes (they wrap projections and
add hooks). No Lightning import: the strategy is built in `iamrec.strategy`.
"""

from __future__ import annotations

import sys

from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from iamrec.attention import base_model
from iamrec.model.loading import BackboneError, load_backbone_config


def decoder_layer_classes(backbone: str | PretrainedConfig | nn.Module) -> frozenset[type[nn.Module]]:
    """The decoder-layer class(es) of `backbone`: a model spec (``tiny``, a folder, a hub id), its
    config, or a built model (plain, peft-wrapped or item-aware)."""
    if isinstance(backbone, nn.Module):
        layers = getattr(base_model(backbone).get_decoder(), "layers", None)
        if not layers:
            raise BackboneError(f"{type(backbone).__name__} has no decoder `layers` to shard.")
        return frozenset(type(layer) for layer in layers)
    config = load_backbone_config(backbone) if isinstance(backbone, str) else backbone
    name = backbone if isinstance(backbone, str) else type(config).__name__
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise BackboneError(
            f"Backbone '{name}' is not a causal LM transformers knows (no ForCausalLM class)."
        )
    module = sys.modules[model_class.__module__]
    names = list(getattr(model_class, "_no_split_modules", None) or [])
    classes = frozenset(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))
    if not classes:
        raise BackboneError(
            f"{model_class.__name__} (backbone '{name}') names no decoder-layer class in _no_split_modules, so "
            "FSDP cannot shard it per layer; give trainer.strategy as an FSDPStrategy with an auto_wrap_policy."
        )
    return classes
