"""Mask predicates: literal matrices, brute force over random segmentations, invariants."""

import pytest
import torch

from iamrec.attention import CONTEXT, PAD, TARGET, dense_mask
from iamrec.attention.masks import kind_rule

C, T, P = CONTEXT, TARGET, PAD
SEG = torch.tensor([[C, C, 1, 1, 2, 2, T]])


def _matrix(rows: str) -> torch.Tensor:
    return torch.tensor([[ch == "x" for ch in row.split()] for row in rows.strip().splitlines()])


LITERAL = {
    ("causal", True): """
        x . . . . . .
        x x . . . . .
        x x x . . . .
        x x x x . . .
        x x x x x . .
        x x x x x x .
        x x x x x x x""",
    ("intra", True): """
        x . . . . . .
        x x . . . . .
        x x x . . . .
        x x x x . . .
        x x . . x . .
        x x . . x x .
        x x . . . . x""",
    ("intra", False): """
        x . . . . . .
        x x . . . . .
        . . x . . . .
        . . x x . . .
        . . . . x . .
        . . . . x x .
        . . . . . . x""",
    ("inter", True): """
        x . . . . . .
        x x . . . . .
        x x x . . . .
        x x . x . . .
        x x x x x . .
        x x x x . x .
        x x x x x x x""",
    ("inter", False): """
        x . . . . . .
        . x . . . . .
        x x x . . . .
        x x . x . . .
        x x x x x . .
        x x x x . x .
        x x x x x x x""",
}


@pytest.mark.parametrize("kind,context_visible", list(LITERAL))
def test_literal_matrices(kind, context_visible):
    got = dense_mask(kind, SEG, context_visible)[0, 0]
    assert torch.equal(got, _matrix(LITERAL[(kind, context_visible)]))


def test_causal_ignores_context_visibility():
    assert torch.equal(dense_mask("causal", SEG, False), dense_mask("causal", SEG, True))


def test_padding_left_and_right():
    seg = torch.tensor([[P, P, C, 1, 1, T], [C, 1, 2, T, P, P]])
    for kind in ("causal", "intra", "inter"):
        m = dense_mask(kind, seg)[:, 0]
        assert not m[0, :, :2].any() and not m[1, :, 4:].any()  # no query ever sees a PAD key


def _random_segments(gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        n_items = int(torch.randint(0, 4, (1,), generator=gen))
        lens = torch.randint(1, 4, (n_items + 3,), generator=gen).tolist()
        row = [C] * lens[0]
        for i in range(n_items):
            row += [i + 1] * lens[i + 1]
        row += [C] * lens[-2] + [T] * lens[-1]
        row = row[:length]
        pad = [P] * (length - len(row))
        left = bool(torch.randint(0, 2, (1,), generator=gen))
        rows.append(pad + row if left else row + pad)
    return torch.tensor(rows)


def _brute(kind: str, seg: list[int], cv: bool) -> list[list[bool]]:
    n = len(seg)
    out = [[False] * n for _ in range(n)]
    for q in range(n):
        for k in range(q + 1):
            if seg[k] == PAD:
                continue
            if kind == "causal":
                ok = True
            elif kind == "intra":
                ok = seg[q] == seg[k]
            else:
                ok = seg[q] != seg[k] or q == k
            out[q][k] = ok or (cv and kind != "causal" and seg[k] == CONTEXT)
    return out


@pytest.mark.parametrize("kind", ["causal", "intra", "inter"])
@pytest.mark.parametrize("context_visible", [True, False])
def test_brute_force_random_segmentations(kind, context_visible):
    gen = torch.Generator().manual_seed(7)
    for _ in range(30):
        seg = _random_segments(gen, 3, 14)
        got = dense_mask(kind, seg, context_visible)[:, 0]
        for b in range(seg.shape[0]):
            assert got[b].tolist() == _brute(kind, seg[b].tolist(), context_visible)


@pytest.mark.parametrize("kind", ["intra", "inter"])
def test_invariants(kind):
    gen = torch.Generator().manual_seed(3)
    seg = _random_segments(gen, 6, 16)
    m = dense_mask(kind, seg)[:, 0]
    causal = dense_mask("causal", seg)[:, 0]
    assert not (m & ~causal).any()  # a subset of causal
    nonpad = seg != PAD
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    assert diag[nonpad].all()  # every real token sees itself: no empty row
    # rows are built from their own batch row only: permuting the batch permutes the masks
    perm = torch.randperm(seg.shape[0], generator=gen)
    assert torch.equal(dense_mask(kind, seg[perm])[:, 0], m[perm])


def test_cached_rows_equal_full_rows():
    seg = torch.tensor([[C, 1, 1, 2, C, T, T, T]])
    for kind in ("intra", "inter"):
        full = dense_mask(kind, seg)
        assert torch.equal(dense_mask(kind, seg, q_offset=6), full[:, :, 6:])


def test_kind_rule_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown attention kind 'cross'"):
        kind_rule("cross", SEG, SEG, SEG, SEG, True)
