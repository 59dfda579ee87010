"""Non-LLM baselines: most-popular (hand-computed) and SASRec (shapes, learning, beats popular)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from iamrec.baselines.popular import evaluate_popular, item_popularity, popularity_order
from iamrec.baselines.sasrec import SASRec, SASRecDataModule, left_pad
from iamrec.data import DataFileError
from iamrec.run_folder import PREDICTION_COLUMNS
from tests.conftest import write_stats


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny models on one thread: on a busy 2-core box, intra-op threads only fight each other
    (measured: the training tests took 2.5x longer with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_processed(root: Path, rows: list[tuple], num_items: int) -> Path:
    """Write a tiny processed dataset; rows are (user_id, history, target, split)."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": range(num_items), "title": [f"item {i}" for i in range(num_items)]}).to_parquet(
        root / "items.parquet"
    )
    samples = pd.DataFrame(rows, columns=["user_id", "history", "target", "split"])
    samples["target_timestamp"] = range(len(samples))
    samples["history"] = samples["history"].map(lambda h: [int(i) for i in h])
    samples.to_parquet(root / "samples.parquet")
    inter = [(u, i, t) for t, (u, h, tgt, _) in enumerate(rows) for i in [*h, tgt]]
    pd.DataFrame(inter, columns=["user_id", "item_id", "timestamp"]).to_parquet(root / "interactions.parquet")
    write_stats(root, items=num_items)
    return root


# ------------------------------------------------------------------------------------ most popular

POPULAR_ROWS = [
    # user 1: two d3 prefixes; item 0 is in both histories but counts once for the user.
    (1, [0], 1, "train"),
    (1, [0, 1], 2, "train"),
    (2, [1], 0, "train"),
    (3, [4], 1, "train"),
    (3, [4], 3, "valid"),  # not training time: item 3 keeps count 0
    (1, [0, 1, 2], 3, "test"),
    (2, [1, 0], 4, "test"),
    (3, [4, 1], 0, "test"),
]


def test_popularity_counts_distinct_users_on_train(tmp_path: Path) -> None:
    samples = pd.read_parquet(write_processed(tmp_path, POPULAR_ROWS, 5) / "samples.parquet")
    counts = item_popularity(samples, 5)
    assert counts.tolist() == [2, 3, 1, 0, 1]
    assert popularity_order(counts).tolist() == [1, 0, 2, 4, 3]  # tie 2/4 broken by item_id


def test_evaluate_popular_hand_computed(tmp_path: Path) -> None:
    data = write_processed(tmp_path / "d", POPULAR_ROWS, 5)
    # List [1, 0, 2, 4, 3]; targets 3, 4, 0 sit at ranks 4, 3, 1 -> with K <= 3 only user 3 is a hit.
    out = evaluate_popular(data, "test", ks=(1, 3), out_dir=tmp_path / "run")
    assert out == pytest.approx(
        {
            "HR@1": 0.0,
            "NDCG@1": 0.0,
            "HR@3": 1 / 3,
            "NDCG@3": 0.21030991785715248,
            "users": 3,
            "invalid_rate": 0,
        }
    )
    assert out["NDCG@3"] == pytest.approx((1 / math.log2(3)) / 3)
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert list(preds.columns) == list(PREDICTION_COLUMNS)  # the same columns as every method's
    assert preds["rank"].tolist() == [-1, -1, 1] and preds["sample_index"].tolist() == [5, 6, 7]
    assert preds["top_items"].map(list).tolist() == [[1, 0, 2]] * 3
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["users"] == 3
    # Excluding history: ranks 4-3=1, 3-2=1, 1-1=0.
    out = evaluate_popular(data, "test", ks=(1, 3), exclude_history=True, out_dir=tmp_path / "run2")
    assert out["HR@1"] == pytest.approx(1 / 3) and out["HR@3"] == 1.0
    preds = pd.read_parquet(tmp_path / "run2" / "predictions.parquet")
    assert preds["top_items"].map(list).tolist() == [[4, 3], [2, 4, 3], [0, 2, 3]]
    assert out["NDCG@3"] == pytest.approx((2 / math.log2(3) + 1) / 3)
    assert evaluate_popular(data, "test", ks=(1, 5), max_users=1)["HR@5"] == 1.0  # user 1: rank 4


def test_evaluate_popular_missing_dataset_message(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="items.parquet is missing; the processed dataset"):
        evaluate_popular(tmp_path)


# ------------------------------------------------------------------------------------------- SASRec

NUM_ITEMS = 30


def cyclic_rows(num_users: int) -> list[tuple]:
    """Users walk the 30-item cycle from different starts; d3-style prefixes (history <= 10).

    The next item is always (last item + 1) mod 30, so a sequence model can reach HR@1 = 1 while
    popularity is flat (HR@10 about 1/3). Per user: 13 train samples, then 1 valid, then 1 test.
    """
    rows = []
    for user in range(num_users):
        seq = [(user * 7 + t) % NUM_ITEMS for t in range(16)]
        for t in range(1, 16):
            split = "test" if t == 15 else "valid" if t == 14 else "train"
            rows.append((user, seq[max(0, t - 10) : t], seq[t], split))
    return rows


@pytest.fixture(scope="module")
def cyclic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 users of :func:`cyclic_rows`."""
    return write_processed(tmp_path_factory.mktemp("cyclic"), cyclic_rows(60), NUM_ITEMS)


def test_left_pad() -> None:
    out = left_pad([[1, 2, 3], [], [4]], max_len=2, pad_id=9)
    assert out.tolist() == [[2, 3], [9, 9], [9, 4]]


def test_datamodule_batches(cyclic_data: Path) -> None:
    dm = SASRecDataModule(str(cyclic_data), max_len=12, batch_size=8)
    assert dm.num_items == NUM_ITEMS
    dm.setup("fit")
    assert [len(dm.datasets[s]) for s in ("train", "valid", "test")] == [780, 60, 60]
    batch = next(iter(dm.val_dataloader()))
    # Every valid history here holds 10 items, so the 2 all-pad columns of the 12 are dropped.
    assert batch["history"].shape == (8, 10) and batch["target"].shape == (8,)
    # User 0, valid sample: history = items 4..13 (10 of them), target 14.
    assert batch["history"][0].tolist() == [*range(4, 14)] and int(batch["target"][0]) == 14
    assert dm.datasets["valid"].history[0].tolist() == [30, 30, *range(4, 14)]  # stored left-padded


def test_batches_drop_all_pad_columns_without_changing_scores(cyclic_data: Path) -> None:
    dm = SASRecDataModule(str(cyclic_data), max_len=40, batch_size=8)
    dm.setup("fit")
    data = dm.datasets["valid"]
    batch = data.__getitems__(list(range(8)))
    full = data.history[:8]  # (8, 40) as stored
    width = batch["history"].shape[1]
    assert width < 40 and (full[:, : 40 - width] == NUM_ITEMS).all()  # only all-pad columns dropped
    assert (batch["history"] != NUM_ITEMS).any(dim=0)[0]  # the first kept column holds an item
    torch.manual_seed(0)
    model = SASRec(num_items=NUM_ITEMS, hidden_size=16, num_heads=2, max_len=40).eval()
    assert torch.allclose(model(batch["history"]), model(full), atol=1e-5)


def test_shapes_and_exclude_history() -> None:
    torch.manual_seed(0)
    model = SASRec(
        num_items=NUM_ITEMS, hidden_size=16, num_heads=2, max_len=6, ks=(1, 5), exclude_history=True
    )
    history = torch.tensor([[30, 30, 1, 2, 3, 4], [30, 30, 30, 30, 30, 30]])
    batch = {"history": history, "target": torch.tensor([5, 0]), "user_id": torch.tensor([0, 1])}
    assert model.encode(history).shape == (2, 6, 16)
    assert model(history).shape == (2, NUM_ITEMS)
    assert torch.isfinite(model(history)).all()  # an all-pad history still gives finite scores
    top, rank = model.rank_targets(batch)
    assert top.shape == (2, 5) and rank.shape == (2,) and rank.dtype == torch.long
    assert not set(top[0].tolist()) & {1, 2, 3, 4}  # history items excluded
    # Pads must not influence real positions: left-padding more must leave the last state unchanged.
    model.eval()
    short = model.encode(torch.tensor([[1, 2, 3, 4]]))[:, -1]
    assert torch.allclose(model.encode(history[:1])[:, -1], short, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        SASRec(num_items=5, hidden_size=10, num_heads=3)


@pytest.mark.parametrize("objective", ["last", "all"])
def test_loss_decreases_on_one_batch(objective: str) -> None:
    torch.manual_seed(0)
    model = SASRec(
        num_items=NUM_ITEMS, hidden_size=32, max_len=8, dropout=0.0, lr=1e-2, train_objective=objective
    )
    history = torch.tensor([[(s + t) % NUM_ITEMS for t in range(8)] for s in range(16)])
    batch = {"history": history, "target": (history[:, -1] + 1) % NUM_ITEMS, "user_id": torch.arange(16)}
    opt = model.configure_optimizers()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_sasrec_learns_cycle_and_beats_popular(cyclic_data: Path, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)  # ~3 s on 2 CPU cores (8 epochs x 13 steps)
    dm = SASRecDataModule(str(cyclic_data), max_len=10, batch_size=64)
    model = SASRec(num_items=None, hidden_size=32, max_len=10, dropout=0.1, lr=5e-3)
    trainer = L.Trainer(
        max_epochs=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert model.hparams.num_items == NUM_ITEMS  # read lazily from the datamodule in setup()
    trainer.save_checkpoint(tmp_path / "sasrec.ckpt")
    reloaded = SASRec.load_from_checkpoint(tmp_path / "sasrec.ckpt").eval()  # rebuilds without a datamodule
    history = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    assert torch.allclose(reloaded(history), model.eval()(history))
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    popular = evaluate_popular(cyclic_data, "test", ks=(1, 5, 10, 20))
    assert popular["HR@10"] < 0.5
    assert result["test/HR@10"] > 0.8 and result["test/HR@10"] > popular["HR@10"] + 0.4
    assert model.test_results["users"] == 60
    ranks = torch.cat([p["rank"] for p in model.test_predictions])
    assert ranks.shape == (60,) and result["test/HR@1"] == pytest.approx((ranks == 0).float().mean().item())


@pytest.mark.slow
def test_two_process_test_equals_single_process(tmp_path: Path) -> None:
    """DDP on CPU (gloo, 2 processes): exact sharding + summed metric states give single-process numbers."""
    # 61 test samples: not divisible by 2, the case where a padding DistributedSampler repeats a user.
    data = str(write_processed(tmp_path, cyclic_rows(61), NUM_ITEMS))
    L.seed_everything(0, verbose=False)
    model = SASRec(num_items=NUM_ITEMS, hidden_size=16, max_len=10)
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    dm = SASRecDataModule(data, max_len=10, eval_batch_size=7)
    single = L.Trainer(accelerator="cpu", devices=1, **quiet).test(model, datamodule=dm, verbose=False)[0]
    dm = SASRecDataModule(data, max_len=10, eval_batch_size=7)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", **quiet)
    two = ddp.test(model, datamodule=dm, verbose=False)[0]
    assert two == pytest.approx(single)
    assert two["test/users"] == 61
