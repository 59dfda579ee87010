"""The GPU tests (`make test-gpu` = `pytest -m gpu`: only this folder is collected, each test's duration
printed; conftest.py). Sized for a sitting: about 90 s on one H200 when last run."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _tiny, run
from test_decoding import _assert_same, _catalogue
from tiny_inputs import item_batch as _batch
from tiny_inputs import item_prompts as _prompts
from tiny_inputs import tiny_model as _model

from iamrec.attention import apply_item_attention
from iamrec.decoding import TitleTrie, constrained_beam_search, reference_beam_search
from iamrec.model.loading import load_backbone

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_lora_fit_then_test_on_gpu(processed_dir, tmp_path):
    """The default recipe on one GPU: bf16 base, fp32 LoRA, bf16-mixed; test decodes on the GPU."""
    extra = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]
    res = run(["fit", *_tiny(processed_dir, tmp_path, *extra, "--model.model_dtype=bfloat16")])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(
        ["test", *_tiny(processed_dir, tmp_path, *extra, "--model.model_dtype=bfloat16"), "--ckpt_path=last"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(next(tmp_path.rglob("test_metrics.json")).read_text())
    assert metrics["users"] == 12 and metrics["invalid_rate"] == 0.0


def test_fsdp_full_finetuning_on_gpu(processed_dir, tmp_path):
    """FSDP for full fine-tuning of larger backbones (LoRA + DDP is the default): sharded per decoder
    layer, fit then test through `iamrec`."""
    extra = [
        "--trainer.accelerator=gpu",
        "--trainer.strategy=fsdp",
        f"--trainer.devices={torch.cuda.device_count()}",
        "--model.lora=null",
        "--trainer.precision=bf16-mixed",
        "--trainer.max_steps=2",
        "--model.warmup_steps=1",
    ]
    res = run(["fit", *_tiny(processed_dir, tmp_path, *extra)])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(["test", *_tiny(processed_dir, tmp_path, *extra), "--ckpt_path=last"])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(next(tmp_path.rglob("test_metrics.json")).read_text())
    assert metrics["users"] == 12 and metrics["invalid_rate"] == 0.0


@pytest.mark.parametrize("schedule", ["iam", "stacked"])
def test_flex_gradients_match_sdpa_on_gpu(schedule):
    ids, mask, seg = (t.cuda() for t in _batch())
    grads = []
    for attn in ("sdpa", "flex"):
        model = apply_item_attention(_model().cuda().train(), schedule, backend=attn)
        out = model(input_ids=ids, attention_mask=mask, segment_ids=seg).logits
        out[mask.bool()].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("schedule", ["iam", "causal"])
def test_fast_beam_search_equals_hf_generate_on_gpu(schedule):
    torch.manual_seed(0)
    m = load_backbone("tiny").eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(5.0)
    model = apply_item_attention(m.cuda(), schedule)
    gpu_trie = TitleTrie.from_sequences(_catalogue(), 600).to(
        "cuda"
    )  # its own trie: the fixture stays on CPU
    ids, mask, seg = (t.cuda() for t in _prompts())
    fast = constrained_beam_search(model, ids, mask, seg, gpu_trie, 6)
    _assert_same(fast, reference_beam_search(model, ids, mask, seg, gpu_trie, 6))
