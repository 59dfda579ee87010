"""Tiny inputs the attention, decoding and added-layer tests share: random tiny models of a family and
small item-segmented batches and prompts (left padding included)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from iamrec.attention import CONTEXT, PAD, TARGET
from iamrec.model.tiny import tiny_config

# words of the small random catalogues the decoding tests build with the tiny tokenizer
TITLE_WORDS = [
    "Toy",
    "Story",
    "Golden",
    "Eye",
    "Four",
    "Rooms",
    "Get",
    "Shorty",
    "Copycat",
    "Twelve",
    "Monkeys",
    "Babe",
    "Dead",
    "Man",
    "Walking",
    "Seven",
]


def tiny_model(family="llama", attn="sdpa", layers=4, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(family, num_hidden_layers=layers)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


def item_batch(seed=0):
    """Two rows: right-aligned full row, and a left-padded one."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :2] = 0
    ids[1, :2] = 0
    seg = torch.tensor(
        [[0, 0, 1, 1, 1, 2, 2, 0, TARGET, TARGET], [PAD, PAD, 0, 1, 1, 2, 2, 0, TARGET, TARGET]]
    )
    return ids, mask, seg


def item_prompts(seed=0):
    """Three prompts of lengths 12, 9, 7, left-padded to 12, with item segments."""
    gen = torch.Generator().manual_seed(seed)
    lengths, L = [12, 9, 7], 12
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    seg = torch.full((3, L), PAD)
    for row, n in enumerate(lengths):
        ids[row, L - n :] = torch.randint(3, 500, (n,), generator=gen)
        mask[row, L - n :] = 1
        n_items = (n - 3) // 2  # context(2) + items of 2 tokens + header(1)
        s = [CONTEXT, CONTEXT] + [k for k in range(1, n_items + 1) for _ in range(2)]
        seg[row, L - n :] = torch.tensor(s + [CONTEXT] * (n - len(s)))
    return ids, mask, seg


def cached_step_logits(model, ids, mask, seg, prompt: int) -> list[torch.Tensor]:
    """Last-position logits of a prefill of the first `prompt` tokens, then one cached step per further
    token (generated positions are TARGET implicitly): what full recompute must equal."""
    with torch.no_grad():
        out = model(
            input_ids=ids[:, :prompt],
            attention_mask=mask[:, :prompt],
            segment_ids=seg[:, :prompt],
            use_cache=True,
        )
        steps = [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out = model(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                segment_ids=seg[:, :prompt],
                past_key_values=getattr(out, "cache", None) or out.past_key_values,  # 5.2x / 5.17 name
                use_cache=True,
            )
            steps.append(out.logits[:, -1])
    return steps


def greedy_generate_equals_recompute(model, ids, mask, seg, logits, new_tokens: int = 4) -> bool:
    """HF greedy `generate` (cached) returns the tokens a full-recompute argmax loop picks; `logits(model,
    ids, mask, seg)` is the caller's full forward."""
    gc = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    generated = model.generate(input_ids=ids, attention_mask=mask, segment_ids=seg, generation_config=gc)
    x, a, s = ids, mask, seg
    for _ in range(new_tokens):
        nxt = logits(model, x, a, s)[:, -1].argmax(-1, keepdim=True)
        x, a = torch.cat([x, nxt], 1), torch.cat([a, torch.ones_like(nxt)], 1)
        s = torch.cat([s, torch.full_like(nxt, TARGET)], 1)
    return torch.equal(generated, x)
