"""FSDP per decoder layer, the model built in `configure_model`, fp32 weights for full fine-tuning."""

from __future__ import annotations

import pytest
import torch
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from iamrec.attention import ItemAttentionConfig
from iamrec.lit_module import IAMRecModule
from iamrec.model import BackboneError, LoraConfig, decoder_layer_classes
from iamrec.model.tiny import tiny_config
from iamrec.strategy import fsdp_strategy


@pytest.mark.parametrize(
    "family,layer",
    [
        ("llama", LlamaDecoderLayer),
        ("qwen2", Qwen2DecoderLayer),
        ("qwen3", Qwen3DecoderLayer),
        ("mistral", MistralDecoderLayer),
    ],
)
def test_decoder_layer_class_of_every_family_from_its_config(family, layer):
    assert decoder_layer_classes(tiny_config(family)) == {layer}
    assert decoder_layer_classes(f"tiny-{family}") == {layer}


def test_a_config_transformers_cannot_build_is_one_sentence():
    with pytest.raises(BackboneError, match="not a causal LM"):
        decoder_layer_classes(PretrainedConfig())


def test_fsdp_wraps_exactly_the_decoder_layers_of_the_built_model():
    """The policy `trainer.strategy: fsdp` gets, applied to the model a LoRA run trains: each decoder layer
    is a unit of its own, nothing else is (embeddings, norm and LM head stay in the root unit)."""
    strategy = fsdp_strategy("tiny")
    policy = strategy.kwargs["auto_wrap_policy"]
    module = IAMRecModule(backbone="tiny", attention=ItemAttentionConfig("iam"), lora=LoraConfig(r=4))
    module.configure_model()
    wrapped = [m for m in module.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    layers = list(module.hf_model.get_decoder().layers)
    assert len(layers) == 4 and len(wrapped) == 4
    assert all(a is b for a, b in zip(wrapped, layers))
    assert {type(m) for m in wrapped} == decoder_layer_classes(module.model) == {LlamaDecoderLayer}
    assert strategy.kwargs["use_orig_params"]  # LoRA: frozen and trainable weights in one unit


def test_configure_model_builds_once():
    module = IAMRecModule(backbone="tiny", lora=None)
    assert "model" not in dict(module.named_children())  # nothing built before the strategy is set up
    with pytest.raises(RuntimeError, match="configure_model"):
        _ = module.hf_model
    module.configure_model()
    model = module.model
    weight = next(model.parameters()).detach().clone()
    module.configure_model()  # Lightning calls it again in every fit/validate/test
    assert module.model is model and torch.equal(next(module.model.parameters()), weight)


def test_full_fine_tuning_keeps_float32_weights():
    with pytest.raises(ValueError, match=r"model.model_dtype=bfloat16 with model.lora=null"):
        IAMRecModule(backbone="tiny", lora=None, model_dtype="bfloat16")
    module = IAMRecModule(backbone="tiny", lora=None)
    module.configure_model()
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    # LoRA may keep a bf16 frozen base; its adapters are fp32
    lora = IAMRecModule(backbone="tiny", lora=LoraConfig(r=4), model_dtype="bfloat16")
    lora.configure_model()
    trainable = {p.dtype for p in lora.parameters() if p.requires_grad}
    frozen = {p.dtype for p in lora.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_full_fine_tuning_refuses_half_precision_trainer():
    import lightning as L

    module = IAMRecModule(backbone="tiny", lora=None)
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-true", logger=False)
    with pytest.raises(ValueError, match="trainer.precision=bf16-true with model.lora=null"):
        module.configure_model()


def test_cli_turns_strategy_fsdp_into_per_layer_fsdp(processed_dir, tmp_path, monkeypatch):
    """`--trainer.strategy=fsdp` reaches the Trainer as an FSDPStrategy wrapping the backbone's decoder
    layers (Lightning's FSDP needs a GPU, so the Trainer itself is not built here)."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.strategies import FSDPStrategy

    from iamrec.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def capture(self, config, callbacks):
        seen.update(config)
        raise Stop

    monkeypatch.setattr(LightningCLI, "_instantiate_trainer", capture)
    with pytest.raises(Stop):
        main(["fit", "--config=configs/tiny.yaml", f"--data.data_dir={processed_dir}",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy=fsdp"])  # fmt: skip
    strategy = seen["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
