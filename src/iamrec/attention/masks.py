"""Attention kinds as predicates over segment ids — each rule written once.

Notation: B batch, Q query positions, K key positions; ``sq``/``sk`` are the segment ids of the query
and key, ``q``/``k`` their absolute positions. Every rule below is *elementwise* tensor code, so the
same function renders a dense ``(B, 1, Q, K)`` mask by broadcasting and a FlexAttention ``BlockMask``
through ``mask_mod`` (vmap over scalars).

On top of every kind sit the two rules of all decoder attention: causal (``k <= q``) and "never a PAD
key". Inside a transformers model those two come from the model's own mask (it also knows the cache
offsets and the backend's format); ``kind_rule`` is what iamrec adds.

Drawn for segments ``C C 1 1 2 2 T`` (C = CONTEXT, T = TARGET), query rows, key columns, x = visible:

    causal                intra, ctx visible    intra, strict         inter, ctx visible    inter, strict
      C C 1 1 2 2 T         C C 1 1 2 2 T         C C 1 1 2 2 T         C C 1 1 2 2 T         C C 1 1 2 2 T
    C x . . . . . .       C x . . . . . .       C x . . . . . .       C x . . . . . .       C x . . . . . .
    C x x . . . . .       C x x . . . . .       C x x . . . . .       C x x . . . . .       C . x . . . . .
    1 x x x . . . .       1 x x x . . . .       1 . . x . . . .       1 x x x . . . .       1 x x x . . . .
    1 x x x x . . .       1 x x x x . . .       1 . . x x . . .       1 x x . x . . .       1 x x . x . . .
    2 x x x x x . .       2 x x . . x . .       2 . . . . x . .       2 x x x x x . .       2 x x x x x . .
    2 x x x x x x .       2 x x . . x x .       2 . . . . x x .       2 x x x x . x .       2 x x x x . x .
    T x x x x x x x       T x x . . . . x       T . . . . . . x       T x x x x x x x       T x x x x x x x

(The inter rows see their own position — "plus q itself" — so no row is ever empty.)
"""

from __future__ import annotations

from typing import Literal

import torch

from iamrec.segments import CONTEXT, PAD

Kind = Literal["causal", "intra", "inter"]
KINDS: tuple[str, ...] = ("causal", "intra", "inter")


def kind_rule(
    kind: str, sq: torch.Tensor, sk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, context_visible: bool
) -> torch.Tensor:
    """What `kind` adds to causal + padding: may a query (segment `sq`, position `q`) see key (`sk`, `k`)?

    All arguments broadcast against each other; the result is a bool tensor of their broadcast shape.
    """
    if kind == "causal":
        return torch.ones_like(sq == sk)
    if kind == "intra":
        allowed = sq == sk
    elif kind == "inter":
        allowed = (sq != sk) | (q == k)
    else:
        raise ValueError(f"unknown attention kind '{kind}'; expected one of {KINDS}")
    if context_visible:
        allowed = allowed | (sk == CONTEXT)
    return allowed


def full_rule(
    kind: str, sq: torch.Tensor, sk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, context_visible: bool
) -> torch.Tensor:
    """The complete predicate: causal, never a PAD key, and the kind's rule (reference and flex path)."""
    return (k <= q) & (sk != PAD) & kind_rule(kind, sq, sk, q, k, context_visible)


def dense_mask(
    kind: str, segment_ids: torch.Tensor, context_visible: bool = True, q_offset: int = 0
) -> torch.Tensor:
    """Render `full_rule` for a whole sequence as a bool ``(B, 1, Q, K)`` mask (True = may attend).

    `segment_ids` is ``(B, K)``, covering every key position; the queries are the last
    ``Q = K - q_offset`` positions (``q_offset`` > 0 during cached decoding).
    """
    seg = segment_ids.long()
    kv_len = seg.shape[-1]
    k = torch.arange(kv_len, device=seg.device)
    q = k[q_offset:]
    sq = seg[:, None, q_offset:, None]  # (B, 1, Q, 1)
    sk = seg[:, None, None, :]  # (B, 1, 1, K)
    return full_rule(kind, sq, sk, q[None, None, :, None], k[None, None, None, :], context_visible)


def segment_mask_mod(kind: str, key_segments: torch.Tensor, context_visible: bool, q_offset: int = 0):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for `kind_rule` over ``(B, K)`` key segments.

    `q_idx` counts from the first query; queries sit at absolute position ``q_idx + q_offset``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx + q_offset
        return kind_rule(
            kind, key_segments[b, q_abs], key_segments[b, kv_idx], q_abs, kv_idx, context_visible
        )

    return mask_mod
