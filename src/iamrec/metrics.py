"""Top-K ranking metrics (HR@K, NDCG@K) as a torchmetrics metric, and the ranks they are computed from.

Every recommender in iamrec (IAM, the LLM baselines, SASRec, most-popular) reduces its output for one
evaluated user to a single integer: the 0-based **rank** of the true item in the returned top-K list, or
``-1`` when the true item is not in the list. The metrics below consume only these ranks, so all methods
are scored by the same code.

With one relevant item per user (leave-one-out and d3 protocols):

- ``HR@K   = mean over users of [rank < K]``
- ``NDCG@K = mean over users of 1 / log2(rank + 2) if rank < K else 0`` (the ideal DCG is 1).

Distributed safety: states are per-K *sums* with ``dist_reduce_fx="sum"``, so torchmetrics merges the
shards of all processes exactly (no mean-of-means) before ``compute()``. Sums are kept in float64 so that a
million users still add up exactly enough for tables printed with 4 decimals.

Duplicate titles: an LLM generates titles, and one title may name several items (remakes, editions). The
convention of :func:`expand_title_beams`/:func:`rank_of_target` is that each beam's title is expanded to
all of its items **in item_id order**, beams are concatenated in beam order, and repeated items are
dropped (first occurrence kept). Ranks are positions in that de-duplicated item list; a beam whose title
names no item (an invalid output) contributes nothing to the list.

Per-sample results (predictions.parquet, the LLM's generated ranks) are gathered from every process by
`gather_samples`: each sample counts once, in sample order, whatever the sampler did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"`ks` must be distinct positive cut-offs such as (1, 5, 10, 20); got {ks}.")
    return tuple(sorted(ks))


class RankingMetrics(Metric):
    """HR@K and NDCG@K for every K in ``ks``, from the 0-based rank of each user's true item.

    ``update(ranks)`` takes a 1-D integer tensor with one entry per evaluated user: the position of the
    true item in the returned list (0 = first), or -1 when it is absent. ``compute()`` returns
    ``{"HR@1": ..., "NDCG@1": ..., ..., "users": n}`` (floats, ``users`` an int; NaN metrics when no
    user was seen).

    Args:
        ks: the cut-offs K; a rank ``r`` counts as a hit at K when ``0 <= r < K``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    hits: Tensor
    ndcg: Tensor
    users: Tensor

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(ks)
        n = len(self.ks)
        self.add_state("hits", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("users", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ranks: Tensor) -> None:
        """Add one batch of users. ``ranks``: (N,) int, 0-based rank of the true item or -1."""
        ranks = torch.as_tensor(ranks, device=self.hits.device).reshape(-1).to(torch.long)
        if ranks.numel() and int(ranks.min()) < -1:
            raise ValueError("ranks must be >= 0 (position of the true item) or -1 (absent).")
        ks = torch.tensor(self.ks, device=ranks.device)  # (K,)
        found = ranks >= 0  # (N,)
        hit = found[None, :] & (ranks[None, :] < ks[:, None])  # (K, N)
        # rank r -> discount 1/log2(r+2); absent users get 0 through the `hit` mask.
        gain = 1.0 / torch.log2(ranks.clamp(min=0).to(torch.float64) + 2.0)  # (N,)
        # Out-of-place on purpose: under `ddp_spawn` the states of a pickled module share memory across
        # processes, and `+=` would add every rank's users into one storage.
        self.hits = self.hits + hit.sum(dim=1).to(torch.float64)
        self.ndcg = self.ndcg + (hit.to(torch.float64) * gain[None, :]).sum(dim=1)
        self.users = self.users + ranks.numel()

    def compute(self) -> dict[str, float | int]:
        """Return ``{"HR@K": float, "NDCG@K": float, ..., "users": int}``."""
        n = int(self.users)
        out: dict[str, float | int] = {}
        for i, k in enumerate(self.ks):
            out[f"HR@{k}"] = float(self.hits[i]) / n if n else math.nan
            out[f"NDCG@{k}"] = float(self.ndcg[i]) / n if n else math.nan
        out["users"] = n
        return out


def expand_title_beams(beam_items: Iterable[Iterable[int]]) -> list[int]:
    """Turn beams (each the set of item ids its generated title names) into one ranked item list.

    Each beam's items are taken in item_id order, beams in beam order, repeats dropped (first kept);
    an empty beam (a title naming no item) adds nothing.

    >>> expand_title_beams([[7], [5, 3], [], [3, 9]])
    [7, 3, 5, 9]
    """
    seen: set[int] = set()
    out: list[int] = []
    for beam in beam_items:
        for item in sorted(int(i) for i in beam):
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


def _as_beam(entry: int | Sequence[int] | Tensor) -> list[int]:
    # An entry is one item id (int, numpy int, 0-d tensor) or a group of ids for a duplicate title.
    if isinstance(entry, Tensor):
        entry = entry.tolist()
    return [int(i) for i in entry] if isinstance(entry, Iterable) else [int(entry)]


def rank_of_target(
    predicted_item_lists: Sequence[Sequence[int | Sequence[int]]],
    targets: Sequence[int] | Tensor,
    max_k: int | None = None,
) -> Tensor:
    """0-based rank of each user's target in that user's predicted list, -1 if absent.

    Args:
        predicted_item_lists: one list per user. Each entry is an item id, or a sequence of item ids for
            a generated title naming several items (duplicate titles); entries are expanded with
            :func:`expand_title_beams`, so ranks count positions in the de-duplicated item list.
        targets: (N,) the true item id per user.
        max_k: if given, only the first ``max_k`` items of each expanded list count (a rank >= max_k
            becomes -1), e.g. when duplicate titles push the expanded list past the beam count.

    Returns:
        (N,) int64 ranks, ready for :meth:`RankingMetrics.update`.
    """
    targets = [int(t) for t in torch.as_tensor(targets).reshape(-1).tolist()]
    if len(predicted_item_lists) != len(targets):
        raise ValueError(f"got {len(predicted_item_lists)} predicted lists for {len(targets)} targets.")
    ranks: list[int] = []
    for beams, target in zip(predicted_item_lists, targets):
        items = expand_title_beams(_as_beam(b) for b in beams)
        r = items.index(target) if target in items else -1
        if max_k is not None and r >= max_k:
            r = -1
        ranks.append(r)
    return torch.tensor(ranks, dtype=torch.long)


def all_processes(items: list[Any]) -> list[Any]:
    """`items` of every process, concatenated in rank order (this process's own when it runs alone).

    Under DDP/FSDP a collective (`torch.distributed.all_gather_object`): every process must call it, and
    every process gets the whole list.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list[list[Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def gather_samples(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """Per-sample rows (one dict per evaluated sample, with a ``sample_index``) of every process as one frame
    of `columns`: each ``sample_index`` once, in sample order. A distributed sampler that pads its shards
    repeats a few samples; those count once. A collective, like `all_processes`."""
    frame = pd.DataFrame(all_processes(rows), columns=list(columns))
    return frame.drop_duplicates("sample_index").sort_values("sample_index").reset_index(drop=True)
