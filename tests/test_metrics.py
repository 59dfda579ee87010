"""HR@K / NDCG@K metrics against hand-computed values, and their distributed merging."""

from __future__ import annotations

import math

import pytest
import torch

from iamrec.metrics import RankingMetrics, expand_title_beams, rank_of_target

# Five users: ranks 0, 2, absent, 9, 4.
RANKS = [0, 2, -1, 9, 4]
# Hand-computed: hits at K=1: {0}; K=5: {0,2,4}; K=10: {0,2,9,4}.
# NDCG gains: rank 0 -> 1, rank 2 -> 1/log2(4) = 0.5, rank 4 -> 1/log2(6), rank 9 -> 1/log2(11).
EXPECTED = {
    "HR@1": 0.2,
    "NDCG@1": 0.2,
    "HR@5": 0.6,
    "NDCG@5": 0.37737056144690834,  # (1 + 0.5 + 0.386852807) / 5
    "HR@10": 0.8,
    "NDCG@10": 0.4351835267104859,  # (1 + 0.5 + 0.386852807 + 0.289064826) / 5
    "users": 5,
}


def _assert_expected(out: dict) -> None:
    assert set(out) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert out["users"] == 5 and isinstance(out["users"], int)


def test_ranking_metrics_hand_computed() -> None:
    m = RankingMetrics(ks=(1, 5, 10))
    m.update(torch.tensor(RANKS))
    _assert_expected(m.compute())
    # The hand-written formulas behind the literals.
    assert EXPECTED["NDCG@5"] == pytest.approx((1 + 0.5 + 1 / math.log2(6)) / 5)


def test_ranking_metrics_batches_accumulate_and_reset() -> None:
    m = RankingMetrics(ks=(1, 5, 10))
    m.update(torch.tensor(RANKS[:2]))
    m.update(torch.tensor(RANKS[2:]))
    _assert_expected(m.compute())
    m.reset()
    m.update(torch.tensor([-1, -1]))
    out = m.compute()
    assert out["HR@10"] == 0.0 and out["NDCG@10"] == 0.0 and out["users"] == 2


def test_default_ks_and_keys() -> None:
    m = RankingMetrics()
    m.update(torch.tensor([19, 20]))
    out = m.compute()
    assert list(out) == ["HR@1", "NDCG@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "users"]
    assert out["HR@20"] == 0.5  # rank 19 is the 20th item: inside top-20; rank 20 is not.
    assert out["NDCG@20"] == pytest.approx(0.5 / math.log2(21))


def test_ranking_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="ks"):
        RankingMetrics(ks=(0, 5))
    with pytest.raises(ValueError, match="-1"):
        RankingMetrics().update(torch.tensor([-2]))


def test_merge_state_equals_single_metric() -> None:
    # Two "processes" each see part of the users; merging must equal one metric over all users.
    a, b = RankingMetrics(ks=(1, 5, 10)), RankingMetrics(ks=(1, 5, 10))
    a.update(torch.tensor(RANKS[:3]))
    b.update(torch.tensor(RANKS[3:]))
    a.merge_state(b)
    _assert_expected(a.compute())


def test_simulated_ddp_sync_equals_single_metric() -> None:
    # Simulate two ranks: torchmetrics' own compute() path calls `dist_sync_fn` (all_gather) once per
    # state, in registration order, and reduces the gathered shards with each state's dist_reduce_fx.
    shards = [torch.tensor(RANKS[:1]), torch.tensor(RANKS[1:])]
    states: list[dict[str, torch.Tensor]] = [{}, {}]
    names = ["hits", "ndcg", "users"]

    def make_gather(local: dict[str, torch.Tensor]):
        calls = iter(names)

        def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
            name = next(calls)
            assert torch.equal(tensor, local[name])  # this rank's own shard
            return [s[name] for s in states]

        return gather

    metrics = []
    for rank, r in enumerate(shards):
        m = RankingMetrics(ks=(1, 5, 10), distributed_available_fn=lambda: True)
        m.update(r)
        states[rank] = {name: getattr(m, name).clone() for name in names}
        metrics.append(m)
    for rank, m in enumerate(metrics):
        m.dist_sync_fn = make_gather(states[rank])
        _assert_expected(m.compute())
        assert int(m.users) == len(shards[rank])  # local state restored after the synced compute


def test_expand_title_beams_and_rank_of_target() -> None:
    # Beam 2's title names items 5 and 3 -> both enter in item_id order (3 then 5); beam 3 is invalid;
    # beam 4 repeats item 3 which is dropped.
    assert expand_title_beams([[7], [5, 3], [], [3, 9]]) == [7, 3, 5, 9]
    preds = [
        [7, [5, 3], [], [3, 9]],
        [7, [5, 3], [], [3, 9]],
        [1, 2],
        [torch.tensor(4), (8,)],
    ]
    ranks = rank_of_target(preds, [5, 9, 6, 8])
    assert ranks.tolist() == [2, 3, -1, 1]
    assert rank_of_target(preds, torch.tensor([5, 9, 6, 8]), max_k=3).tolist() == [2, -1, -1, 1]
    # A (B, K) tensor of top-K item ids (one item per beam) works as well.
    assert rank_of_target(torch.tensor([[3, 1], [2, 0]]), torch.tensor([1, 5])).tolist() == [1, -1]
    with pytest.raises(ValueError):
        rank_of_target(preds, [1])
