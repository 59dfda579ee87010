"""`iamrec.model.build_model` and `ItemAttentionConfig`: the settings object is the one source of truth."""

from __future__ import annotations

import pytest
import torch

from iamrec.attention import ItemAttentionConfig, ScheduleError, apply_item_attention, installed_state
from iamrec.model import LoraConfig, build_model, load_backbone


def _inputs():
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 12))
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 0, -2, -2, -2]] * 2)
    return ids, torch.ones_like(ids), seg


def test_config_and_keywords_install_the_same_attention():
    ids, mask, seg = _inputs()
    torch.manual_seed(0)
    a = apply_item_attention(load_backbone("tiny"), "split", "eager", False, split_at=1)
    torch.manual_seed(0)
    config = ItemAttentionConfig("split", "eager", False, split_at=1)
    b = apply_item_attention(load_backbone("tiny"), config=config)
    assert (
        installed_state(a).slot_kind
        == installed_state(b).slot_kind
        == {0: "intra", 1: "inter", 2: "inter", 3: "inter"}
    )
    with torch.no_grad():
        torch.testing.assert_close(
            a(input_ids=ids, attention_mask=mask, segment_ids=seg).logits,
            b(input_ids=ids, attention_mask=mask, segment_ids=seg).logits,
            rtol=0,
            atol=0,
        )


def test_build_model_lora_and_full():
    lora = build_model("tiny", ItemAttentionConfig("iam"), LoraConfig(r=4, target_modules=("q_proj",)))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "q_proj" in n for n in trainable)
    assert installed_state(lora).schedule[0] == ("intra",)
    full = build_model("tiny", ItemAttentionConfig("causal"), None)
    assert all(p.requires_grad for p in full.parameters())
    assert not hasattr(full, "get_base_model")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"schedule": "alternate"}, "attention.schedule='alternate' is not a preset"),
        ({"backend": "xformers"}, "attention.backend='xformers' is not one of sdpa, eager, flex"),
    ],
)
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ItemAttentionConfig(**kwargs)


def test_schedule_that_does_not_fit_names_the_cli_key():
    with pytest.raises(
        ScheduleError, match=r"model.attention.schedule lists 2 layers but the backbone has 4"
    ):
        build_model("tiny", ItemAttentionConfig(["intra", "inter"]), None)


def test_lora_config_rejects_rank_zero():
    with pytest.raises(ValueError, match=r"lora.r=0 must be >= 1"):
        LoraConfig(r=0)
