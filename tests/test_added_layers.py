"""Added item-aware sublayers (``added_*`` presets, ``ItemAttentionConfig.added``): the guarantees of the masked
schedules — stock logits at installation, cached decoding = full recompute, trie decoder = HF beams, four
families — and training (LoRA reaches the new projections; full fine-tuning trains them)."""

import copy
import random

import pytest
import torch
from tiny_inputs import TITLE_WORDS, cached_step_logits, greedy_generate_equals_recompute
from tiny_inputs import item_batch as _batch
from tiny_inputs import item_prompts as _prompts
from tiny_inputs import tiny_model as _model

from iamrec.attention import (
    PRESETS,
    TARGET,
    ItemAttentionConfig,
    ScheduleError,
    apply_item_attention,
    describe,
    installed_state,
    remove_item_attention,
)
from iamrec.attention.passes import AddedItemAttention
from iamrec.attention.schedule import ADDED_PRESETS, added_preset_entries, resolve_added
from iamrec.decoding import TitleTrie, constrained_beam_search, reference_beam_search
from iamrec.model import LoraConfig, build_model
from iamrec.model.tiny import build_tiny_tokenizer

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
EOS = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (`tiny_inputs.one_thread`)."""


def _sublayers(model) -> list[AddedItemAttention]:
    return [m for m in model.modules() if isinstance(m, AddedItemAttention)]


def _wake(model, seed=1, scale=0.5):
    """Random output projections for the added sublayers, so they change the output (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in _sublayers(model):
            o_proj = getattr(sub.self_attn.o_proj, "base_layer", sub.self_attn.o_proj)
            o_proj.weight.copy_(
                torch.randn(o_proj.weight.shape, generator=gen) * scale / o_proj.weight.shape[1] ** 0.5
            )
    return model


def _logits(model, ids, mask, seg):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits


# ---------------------------------------------------------------- settings


def test_added_presets_resolve_and_describe():
    assert set(ADDED_PRESETS) <= set(PRESETS)
    assert added_preset_entries("added_iam", 4) == ["intra+inter"] * 4
    assert added_preset_entries("added_inter_first", 2) == ["inter+intra"] * 2
    assert added_preset_entries("added_top", 4) == ["", "", "intra+inter", "intra+inter"]
    assert added_preset_entries("added_top", 4, split_at=1) == [""] + ["intra+inter"] * 3
    assert added_preset_entries("added_alternate", 3) == ["intra", "inter", "intra"]
    assert added_preset_entries("added_causal", 1) == ["causal+causal"]
    assert added_preset_entries("iam", 2) == ["", ""]
    assert resolve_added(["intra+inter", "", "none", "inter"], 4) == [("intra", "inter"), (), (), ("inter",)]
    model = apply_item_attention(_model(), "added_top")
    state = installed_state(model)
    assert describe(state.schedule, state.added) == "causal,causal,causal>intra>inter,causal>intra>inter"
    # slots after the decoder layers', in layer order
    assert {s: k for s, k in state.slot_kind.items() if s >= 4} == {
        4: "intra",
        5: "inter",
        6: "intra",
        7: "inter",
    }
    assert [sub.self_attn.layer_idx for sub in _sublayers(model)] == [4, 5, 6, 7]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"schedule": "added_iam", "added": ["intra"] * 4},
            "added is set but attention.schedule='added_iam'",
        ),
        (
            {"schedule": "causal", "added": ["intra"] * 3},
            "model.attention.added lists 3 layers but the backbone has 4",
        ),
        (
            {"schedule": "causal", "added": ["", "cross", "", ""]},
            r"model.attention.added\[1\]='cross' is not a kind",
        ),
        ({"schedule": "added_top", "split_at": 4}, "split_at=4 must lie in"),
    ],
)
def test_added_settings_errors_name_the_key(kwargs, message):
    with pytest.raises((ScheduleError, ValueError), match=message):
        build_model("tiny", ItemAttentionConfig(**kwargs), None)


# ---------------------------------------------------------------- exactness at installation


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", ["added_iam", "added_alternate"])
def test_added_sublayers_start_bit_exact_as_the_stock_model(family, schedule):
    """The output projections start at zero, so each sublayer adds exactly 0.0 to the residual stream."""
    model = _model(family)
    stock = copy.deepcopy(model)
    ids, mask, seg = _batch()
    ref = _logits(stock, ids, mask, None)
    apply_item_attention(model, schedule)
    assert len(_sublayers(model)) == (8 if schedule == "added_iam" else 4)
    assert torch.equal(_logits(model, ids, mask, seg), ref)  # every position, padding included
    assert torch.equal(_logits(model, ids, mask, None), ref)  # without segment ids the sublayers are skipped


def test_added_sublayers_start_as_stock_under_lora_either_order_and_eager():
    ids, mask, seg = _batch()
    ref = _logits(_model(), ids, mask, None)
    lora_first = build_model("tiny-llama", ItemAttentionConfig("added_top"), LoraConfig(r=4))
    # LoRA's B = 0 and the zero output projections: with segments the same as without (= its stock model)
    assert torch.equal(_logits(lora_first.eval(), ids, mask, seg), _logits(lora_first, ids, mask, None))
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    iam_first = get_peft_model(
        apply_item_attention(_model(), "added_iam"),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ).eval()
    assert torch.equal(_logits(iam_first, ids, mask, seg), ref)
    trainable = {n for n, p in iam_first.named_parameters() if p.requires_grad}
    assert any("iam_added.1.self_attn.o_proj.lora_B" in n for n in trainable)  # peft's targets reach them
    assert not any("iam_added" in n and "lora_" not in n for n in trainable)
    eager = _model(attn="eager")
    ref_eager = _logits(eager, ids, mask, None)
    apply_item_attention(eager, "added_iam", backend="eager")
    assert torch.equal(_logits(eager, ids, mask, seg), ref_eager)


def test_remove_and_reinstall_drop_the_sublayers():
    model = apply_item_attention(_model(), "added_iam")
    assert any("iam_added" in k for k in model.state_dict())
    apply_item_attention(model, "iam")
    assert not any("iam_added" in k for k in model.state_dict())
    apply_item_attention(model, "causal", added=["", "inter", "", "intra+inter"])
    assert len(_sublayers(model)) == 3
    remove_item_attention(model)
    assert set(model.state_dict()) == set(_model().state_dict())


# ---------------------------------------------------------------- cached decoding and generation


@pytest.mark.parametrize(
    "family,schedule,added",
    [
        ("llama", "added_iam", None),
        ("qwen3", "added_top", None),
        ("qwen2", "added_inter_first", None),
        ("mistral", "stacked", ["intra", "", "inter+intra", ""]),  # after the stacked passes' slots
    ],
)
def test_added_cached_decoding_equals_full_recompute(family, schedule, added):
    model = _wake(apply_item_attention(_model(family), schedule, added=added))
    ids, mask, seg = _batch()
    full = _logits(model, ids, mask, seg)
    assert not torch.allclose(full, _logits(model, ids, mask, None), atol=1e-3)  # the sublayers matter
    prompt = 8  # everything before the TARGET tokens
    steps = cached_step_logits(model, ids, mask, seg, prompt)
    for i, step in enumerate(steps):
        assert torch.allclose(step, full[:, prompt - 1 + i], atol=1e-5)


def test_added_greedy_generate_equals_manual_full_recompute():
    model = _wake(apply_item_attention(_model(), "added_iam"))
    ids, mask, seg = (t[:, :8] for t in _batch())
    assert greedy_generate_equals_recompute(model, ids, mask, seg, _logits)


def _catalogue(n=30, seed=0):
    tok = build_tiny_tokenizer()
    rng = random.Random(seed)
    titles = [" ".join(rng.sample(TITLE_WORDS, rng.randint(1, 3))) + f" ({1990 + i})" for i in range(n - 1)]
    titles.append(titles[3])  # a duplicate title
    return [tok(t, add_special_tokens=False)["input_ids"] + [EOS] for t in titles]


def _sharp_model(schedule):
    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # well-separated beams (no near-ties), as in test_decoding
    return apply_item_attention(model, schedule)


@pytest.mark.parametrize("schedule", ["added_iam", "added_top"])
def test_trie_decoder_returns_hf_beams_with_added_sublayers(schedule):
    model = _wake(_sharp_model(schedule))
    trie = TitleTrie.from_sequences(_catalogue(), 600)
    ids, mask, seg = _prompts()
    ref = reference_beam_search(model, ids, mask, seg, trie, 4)
    for shared in (True, False):
        fast = constrained_beam_search(model, ids, mask, seg, trie, 4, shared_prompt=shared)
        edges = constrained_beam_search(model, ids, mask, seg, trie, 4, shared_prompt=shared, table=False)
        assert torch.equal(fast.sequences, edges.sequences) and torch.equal(fast.scores, edges.scores)
        for i in range(3):
            assert [fast.answer(i, j) for j in range(4)] == [ref.answer(i, j) for j in range(4)]
        assert torch.equal(fast.item_ids, ref.item_ids)
        assert torch.allclose(fast.scores, ref.scores, atol=1e-5, rtol=4 * torch.finfo(torch.float32).eps)
    plain = reference_beam_search(
        _sharp_model("causal"), ids, mask, seg, trie, 4
    )  # same weights, no sublayers
    assert not torch.allclose(plain.scores, ref.scores, atol=1e-3)  # so the sublayers took part


# ---------------------------------------------------------------- training


def _step(model, ids, mask, seg, opt):
    labels = ids.masked_fill(seg != TARGET, -100)
    loss = model(input_ids=ids, attention_mask=mask, segment_ids=seg, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_lora_trains_the_added_sublayers():
    """LoRA adapters reach the sublayers' projections; after one step they change the logits."""
    ids, mask, seg = _batch()
    model = build_model("tiny-llama", ItemAttentionConfig("added_iam"), LoraConfig(r=4, dropout=0.0)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = _logits(model, ids, mask, seg)
    _step(model, ids, mask, seg, opt)
    subs = _sublayers(model)
    lora_b = [sub.self_attn.o_proj.lora_B["default"].weight for sub in subs]
    assert all(bool(b.abs().sum() > 0) for b in lora_b)  # the zero output projection learned
    trained = _logits(model, ids, mask, seg)
    assert not torch.allclose(trained, start, atol=1e-4)
    with torch.no_grad():
        saved = [b.clone() for b in lora_b]
        for b in lora_b:
            b.zero_()
        assert not torch.allclose(_logits(model, ids, mask, seg), trained, atol=1e-4)  # their share
        for b, s in zip(lora_b, saved):
            b.copy_(s)
    labels = ids.masked_fill(seg != TARGET, -100)
    model(input_ids=ids, attention_mask=mask, segment_ids=seg, labels=labels).loss.backward()
    q = subs[0].self_attn.q_proj.lora_B["default"].weight.grad
    assert q is not None and bool(q.abs().sum() > 0)  # once o_proj is non-zero, q/k/v learn too


def test_lora_without_o_proj_is_refused():
    with pytest.raises(ValueError, match="must include o_proj"):
        build_model(
            "tiny", ItemAttentionConfig("added_iam"), LoraConfig(r=4, target_modules=("q_proj", "v_proj"))
        )


def test_full_fine_tuning_trains_the_added_sublayers():
    ids, mask, seg = _batch()
    model = build_model("tiny-llama", ItemAttentionConfig("added_top"), None).train()
    subs = _sublayers(model)
    assert all(p.requires_grad for sub in subs for p in sub.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = _logits(model, ids, mask, seg)
    _step(model, ids, mask, seg, opt)
    assert all(bool(sub.self_attn.o_proj.weight.abs().sum() > 0) for sub in subs)
    trained = _logits(model, ids, mask, seg)
    assert not torch.allclose(trained, start, atol=1e-4)
    with torch.no_grad():
        for sub in subs:
            sub.self_attn.o_proj.weight.zero_()
    assert not torch.allclose(_logits(model, ids, mask, seg), trained, atol=1e-4)


def test_added_sublayers_under_activation_checkpointing():
    """Checkpointing enabled before installing (as build_model does) covers the sublayers: same outputs, grads."""
    ids, mask, seg = _batch()
    grads, outs = [], []
    for checkpointing in (False, True):
        model = _model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _wake(apply_item_attention(model, "added_iam"))
        assert all(sub.gradient_checkpointing == checkpointing for sub in _sublayers(model))
        out = model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits
        out[mask.bool()].square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
