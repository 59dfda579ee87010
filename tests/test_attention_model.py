"""Item-aware attention inside real transformers models (tiny random configs, CPU)."""

import copy
from pathlib import Path

import pytest
import torch
from tiny_inputs import cached_step_logits, greedy_generate_equals_recompute
from tiny_inputs import item_batch as _batch
from tiny_inputs import tiny_model as _model
from transformers import GenerationConfig

from iamrec.attention import PRESETS, TARGET, ScheduleError, apply_item_attention, remove_item_attention
from iamrec.attention.schedule import resolve_schedule

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
SMOLLM2 = Path(".assets/models/SmolLM2-135M-Instruct")


# ---------------------------------------------------------------- schedules


def test_presets_resolve_for_odd_and_even_depths():
    for n in (4, 5, 30):
        for name in PRESETS:
            sched = resolve_schedule(name, n)
            assert len(sched) == n
    assert resolve_schedule("iam", 4) == [("intra",), ("inter",), ("intra",), ("inter",)]
    assert resolve_schedule("iam_inter_first", 3) == [("inter",), ("intra",), ("inter",)]
    assert resolve_schedule("split", 4, split_at=1) == [("intra",), ("inter",), ("inter",), ("inter",)]
    assert resolve_schedule("stacked_inter_first", 2) == [("inter", "intra")] * 2
    assert resolve_schedule("hatllm", 6, hatllm_bands=(1, 2)) == [
        ("intra",),
        ("causal",),
        ("causal",),
        ("causal",),
        ("inter",),
        ("inter",),
    ]


@pytest.mark.parametrize(
    "schedule,kwargs,message",
    [
        (["intra"] * 3, {}, "model.schedule lists 3 layers but the backbone has 4"),
        (["intra", "inter", "cross", "intra"], {}, r"model.schedule\[2\]='cross' is not a kind"),
        ("alternate", {}, "model.schedule='alternate' is not a preset"),
        ("split", {"split_at": 4}, "split_at=4 must lie strictly between 0 and the 4"),
        ("hatllm", {"hatllm_bands": (3, 2)}, r"hatllm_bands=\(3, 2\) does not fit 4 decoder layers"),
    ],
)
def test_schedule_errors_name_the_key(schedule, kwargs, message):
    with pytest.raises(ScheduleError, match=message):
        resolve_schedule(schedule, 4, key="model.schedule", **kwargs)


def test_apply_rejects_schedule_that_does_not_fit_backbone():
    with pytest.raises(ScheduleError, match="schedule lists 2 layers but the backbone has 4 decoder layers"):
        apply_item_attention(_model(), ["intra", "inter"])


# ---------------------------------------------------------------- exactness against stock


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_schedule_and_no_segments_equal_stock_logits(family, attn):
    model = _model(family, attn)
    stock = copy.deepcopy(model)
    ids, mask, seg = _batch()
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask).logits
        apply_item_attention(model, "causal", backend=attn)
        with_seg = model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits
        apply_item_attention(model, "iam", backend=attn)
        without_seg = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.equal(with_seg[real], ref[real])
    assert torch.equal(without_seg, ref)
    remove_item_attention(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


# ---------------------------------------------------------------- black-box semantics


def _logits(model, ids, mask, seg):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_intra_only_isolates_items(family):
    model = apply_item_attention(_model(family), "intra_only")
    ids, mask, seg = _batch()
    changed = ids.clone()
    changed[:, 2:5] = 11  # item 1 of row 0
    a, b = _logits(model, ids, mask, seg), _logits(model, changed, mask, seg)
    assert torch.allclose(a[0, 5:], b[0, 5:], atol=1e-5)  # item 2, context, target: untouched
    assert not torch.allclose(a[0, 2:5], b[0, 2:5], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_inter_only_ignores_earlier_tokens_of_same_item(family):
    model = apply_item_attention(_model(family), "inter_only")
    ids, mask, seg = _batch()
    changed = ids.clone()
    changed[0, 2] = 11  # first token of item 1 (row 0); item 1 spans positions 2..4
    a, b = _logits(model, ids, mask, seg), _logits(model, changed, mask, seg)
    assert torch.allclose(a[0, 3:5], b[0, 3:5], atol=1e-5)
    assert not torch.allclose(a[0, 5:], b[0, 5:], atol=1e-3)  # later items do see it


@pytest.mark.parametrize("schedule", ["iam", "stacked", "hatllm"])
def test_changing_item_one_changes_target_outputs(schedule):
    model = apply_item_attention(_model(layers=6), schedule)
    ids, mask, seg = _batch()
    changed = ids.clone()
    changed[0, 2:5] = 11
    a, b = _logits(model, ids, mask, seg), _logits(model, changed, mask, seg)
    assert not torch.allclose(a[0, 8:], b[0, 8:], atol=1e-3)


# ---------------------------------------------------------------- backends agree


@pytest.mark.parametrize("schedule", ["iam", "stacked_inter_first", "hatllm"])
def test_eager_and_sdpa_agree_in_outputs_and_gradients(schedule):
    ids, mask, seg = _batch()
    grads, outs = [], []
    for attn in ("eager", "sdpa"):
        model = apply_item_attention(_model("llama", attn, layers=6).train(), schedule, backend=attn)
        out = model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits
        (out[mask.bool()].float().square().mean()).backward()
        outs.append(out.detach()[mask.bool()])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_flex_forward_agrees_with_sdpa_on_cpu():
    """FlexAttention runs forward only on CPU (no backward), and compiles for ~30 s."""
    ids, mask, seg = _batch()
    sdpa = apply_item_attention(_model(), "iam", backend="sdpa")
    flex = apply_item_attention(_model(), "iam", backend="flex")
    a, b = _logits(sdpa, ids, mask, seg), _logits(flex, ids, mask, seg)
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)


# ---------------------------------------------------------------- cached decoding and generation


@pytest.mark.parametrize("schedule", ["iam", "stacked", "hatllm"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_decoding_equals_full_recompute(schedule, family):
    model = apply_item_attention(_model(family, layers=6), schedule)
    ids, mask, seg = _batch()
    full = _logits(model, ids, mask, seg)
    prompt = 8  # everything before the TARGET tokens
    steps = cached_step_logits(model, ids, mask, seg, prompt)
    for i, step in enumerate(steps):
        assert torch.allclose(step, full[:, prompt - 1 + i], atol=1e-5)


@pytest.mark.parametrize("schedule", ["iam", "stacked"])
def test_greedy_generate_equals_manual_full_recompute(schedule):
    model = apply_item_attention(_model(), schedule)
    ids, mask, seg = _batch()
    ids, mask, seg = ids[:, :8], mask[:, :8], seg[:, :8]
    assert greedy_generate_equals_recompute(model, ids, mask, seg, _logits)


@pytest.mark.parametrize("schedule", ["iam", "stacked", "hatllm"])
def test_beam_search_with_left_padding_equals_batch_of_one(schedule):
    model = apply_item_attention(_model(layers=6), schedule)
    ids, mask, seg = _batch()
    ids, mask, seg = ids[:, :8], mask[:, :8], seg[:, :8]
    gc = GenerationConfig(
        max_new_tokens=4,
        num_beams=4,
        num_return_sequences=4,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=True,
        pad_token_id=0,
        eos_token_id=2,
        output_scores=True,
        return_dict_in_generate=True,
    )
    both = model.generate(input_ids=ids, attention_mask=mask, segment_ids=seg, generation_config=gc)
    alone = model.generate(
        input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:], segment_ids=seg[1:, 2:], generation_config=gc
    )
    assert torch.equal(both.sequences[4:, 8:], alone.sequences[:, 6:])
    assert torch.allclose(both.sequences_scores[4:], alone.sequences_scores, atol=1e-5)


# ---------------------------------------------------------------- training paths


@pytest.mark.parametrize("schedule", PRESETS)
def test_lora_training_step_with_each_preset(schedule):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(layers=6).train(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    apply_item_attention(model, schedule)
    ids, mask, seg = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = ids.masked_fill(seg != TARGET, -100)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, segment_ids=seg, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_and_bf16():
    ids, mask, seg = _batch()
    model = apply_item_attention(_model(layers=4).train(), "stacked")
    ref = model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits
    ref.square().mean().backward()
    ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits
    out.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight.grad, ref_grad, atol=1e-6)
    bf16 = apply_item_attention(_model(layers=4).to(torch.bfloat16), "iam")
    logits = _logits(bf16, ids, mask, seg)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason="run `make assets` first")
@pytest.mark.parametrize("schedule", PRESETS)
def test_lora_step_on_real_smollm2(schedule):
    from peft import LoraConfig, get_peft_model

    from iamrec.model.loading import load_backbone

    model = load_backbone(str(SMOLLM2)).train()
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    apply_item_attention(model, schedule)
    ids, mask, seg = _batch()
    labels = ids.masked_fill(seg != TARGET, -100)
    loss = model(input_ids=ids, attention_mask=mask, segment_ids=seg, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
