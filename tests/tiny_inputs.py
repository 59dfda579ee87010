"""Tiny inputs the attention, decoding and added-layer tests share: random tiny models of a family and
small item-segmented batches and prompts (left padding included)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from iamrec.attention import CONTEXT, PAD, TARGET
from iamrec.model.tiny import tiny_config


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
