"""IAMDataModule on a tiny processed dataset: batches, subsets, bucketing (incl. DDP), file errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from iamrec.data import DataFileError, IAMDataModule, LengthGroupedBatchSampler, encode_answer
from iamrec.segments import PAD, TARGET
from tests.conftest import write_stats

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Copycat (1995)", "Babe (1995)"]


def write_dataset(root: Path, samples: pd.DataFrame | None = None, items: pd.DataFrame | None = None) -> Path:
    """A processed dataset in the processed-data contract's layout (data_prep/common.py)."""
    root.mkdir(parents=True, exist_ok=True)
    if items is None:
        items = pd.DataFrame({"item_id": np.arange(len(TITLES), dtype=np.int64), "title": TITLES})
    if samples is None:
        rng = np.random.default_rng(0)
        rows = []
        for i in range(40):
            target = int(rng.integers(0, len(TITLES)))
            others = [j for j in range(len(TITLES)) if j != target]
            history = [int(x) for x in rng.choice(others, size=int(rng.integers(0, 4)) + 1)]
            split = "train" if i < 30 else ("valid" if i < 35 else "test")
            rows.append((i % 7, history, target, 1000 + i, split))
        samples = pd.DataFrame(rows, columns=["user_id", "history", "target", "target_timestamp", "split"])
    items.to_parquet(root / "items.parquet")
    samples.to_parquet(root / "samples.parquet")
    write_stats(root)
    return root


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "toy")


def test_train_and_eval_batches(data_dir):
    dm = IAMDataModule(str(data_dir), "tiny", batch_size=4, eval_batch_size=3)
    assert dm.titles == TITLES and dm.num_items == 5
    assert dm.answer_token_ids == [encode_answer(dm.tokenizer, dm.template, t) for t in TITLES]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == sorted(
        ["input_ids", "attention_mask", "labels", "segment_ids", "target", "user_id", "sample_index"]
        + ["target_positions", "target_labels"]
    )
    B, L = batch["input_ids"].shape
    assert B == 4 and all(batch[k].shape == (B, L) for k in ("attention_mask", "labels", "segment_ids"))
    assert batch["target"].shape == batch["user_id"].shape == (B,)
    assert batch["segment_ids"].eq(PAD).equal(batch["attention_mask"].eq(0))
    # Labels are the input ids exactly on the TARGET tokens.
    is_target = batch["segment_ids"] == TARGET
    assert batch["labels"][is_target].equal(batch["input_ids"][is_target])
    assert batch["labels"][~is_target].eq(-100).all()

    val = next(iter(dm.val_dataloader()))
    samples = pd.read_parquet(data_dir / "samples.parquet")
    assert val["input_ids"].shape[0] == 3 and val["prompt_input_ids"].shape[0] == 3
    assert (samples["split"].to_numpy()[val["sample_index"].numpy()] == "valid").all()
    assert val["target"].tolist() == samples["target"].to_numpy()[val["sample_index"].numpy()].tolist()
    # Prompts are left-padded and never contain TARGET tokens; their last token ends the header.
    assert val["prompt_attention_mask"][:, -1].eq(1).all()
    assert not val["prompt_segment_ids"].eq(TARGET).any()
    header_end = dm.encoder.header_ids[True][-1]
    assert val["prompt_input_ids"][:, -1].eq(header_end).all()


def test_stages_and_predict_split(data_dir):
    dm = IAMDataModule(str(data_dir), "tiny", predict_split="valid")
    dm.setup("test")
    assert set(dm.datasets) == {"test"} and len(dm.datasets["test"]) == 5
    dm.setup("predict")
    assert len(next(iter(dm.predict_dataloader()))["prompt_input_ids"]) == 5


def test_subsets_are_seeded_and_deterministic(data_dir):
    def rows(split, **kw):
        dm = IAMDataModule(str(data_dir), "tiny", **kw)
        dm.setup(None)
        return dm.datasets[split].rows.tolist()

    a = rows("train", max_train_samples=10, seed=1)
    assert len(a) == 10 and a == sorted(a) and a == rows("train", max_train_samples=10, seed=1)
    assert a != rows("train", max_train_samples=10, seed=2)
    v = rows("valid", max_eval_samples=2)
    assert len(v) == 2 and v == rows("valid", max_eval_samples=2)
    assert len(rows("test", max_eval_samples=99)) == 5


def test_one_eval_subset_rule_for_every_method(processed_dir, tmp_path):
    """`eval_subset_rows` is the subset the LLM data module, SASRec and most-popular all score."""
    from iamrec.baselines.popular import evaluate_popular
    from iamrec.baselines.sasrec import SASRecDataModule
    from iamrec.data import eval_subset_rows, load_samples

    samples = load_samples(processed_dir)
    for split, n, seed in (("test", 5, 0), ("test", 5, 3), ("valid", 4, 1)):
        rows = eval_subset_rows(processed_dir, split, n, seed)
        assert len(rows) == n and rows.tolist() == sorted(rows.tolist())
        assert (samples.split[rows] == split).all()
        assert rows.tolist() == eval_subset_rows(samples, split, n, seed).tolist()  # folder or Samples
        llm = IAMDataModule(str(processed_dir), "tiny", max_eval_samples=n, seed=seed)
        llm.setup("validate" if split == "valid" else "test")
        sasrec = SASRecDataModule(str(processed_dir), max_eval_samples=n, seed=seed)
        sasrec.setup("fit")
        assert llm.datasets[split].rows.tolist() == rows.tolist()
        assert sasrec.datasets[split].sample_index.tolist() == rows.tolist()
    # None keeps the whole split
    assert eval_subset_rows(samples, "test", None, 0).tolist() == samples.rows("test").tolist()
    rows = eval_subset_rows(processed_dir, "test", 5, 0)
    evaluate_popular(processed_dir, "test", sample_indices=rows, out_dir=tmp_path / "popular")
    popular = pd.read_parquet(tmp_path / "popular" / "predictions.parquet")
    assert popular["sample_index"].tolist() == rows.tolist()
    assert popular["user_id"].tolist() == samples.user_id[rows].tolist()
    with pytest.raises(ValueError, match="split must be one of"):
        eval_subset_rows(samples, "train", 5, 0)


def test_training_shuffle_is_seeded(data_dir):
    def order(seed):
        dm = IAMDataModule(str(data_dir), "tiny", batch_size=30, seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["sample_index"].tolist()

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(30))


def test_dataset_pickles_for_workers(data_dir):
    dm = IAMDataModule(str(data_dir), "tiny")
    dm.setup("fit")
    ds = pickle.loads(pickle.dumps(dm.datasets["train"]))
    assert ds[3] == dm.datasets["train"][3]


# --- bucketing ---------------------------------------------------------------------------------------------
def test_bucketing_covers_every_sample_once_and_groups_lengths():
    lengths = [int(x) for x in np.random.default_rng(0).integers(10, 200, size=103)]
    sampler = LengthGroupedBatchSampler(
        RandomSampler(range(103), generator=torch.Generator().manual_seed(0)), 8, False, lengths, 0, 4
    )
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(103)) and len(batches) == len(sampler) == 13
        assert sum(len(b) < 8 for b in batches) == 1
        spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches])
        assert spread < 60  # random batches of 8 from U(10, 200) spread ~150
    assert epochs[0] != epochs[1]  # still shuffled
    sampler.set_epoch(0)
    again = LengthGroupedBatchSampler(
        RandomSampler(range(103), generator=torch.Generator().manual_seed(0)), 8, False, lengths, 0, 4
    )
    assert list(again) == epochs[0]  # seeded
    assert all(len(b) == 8 for b in LengthGroupedBatchSampler(range(103), 8, True, lengths))


def test_bucketing_under_ddp_via_lightning_reinjection(data_dir):
    """Lightning swaps our inner sampler for a DistributedSampler: ranks split the data, same #batches."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = IAMDataModule(str(data_dir), "tiny", batch_size=4, bucket_by_length=True)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning calls the hook
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler)
    seen, counts = [], []
    for rank in range(2):
        dist = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        ddp_loader = _update_dataloader(loader, dist, mode=RunningStage.TRAINING)
        assert ddp_loader.batch_sampler.sampler is dist
        batches = [b["sample_index"].tolist() for b in ddp_loader]
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
    assert counts[0] == counts[1] and sorted(seen) == list(range(30))


# --- errors ------------------------------------------------------------------------------------------------
def _samples(rows):
    return pd.DataFrame(rows, columns=["user_id", "history", "target", "target_timestamp", "split"])


GOOD = [(0, [0], 1, 1, "train"), (0, [0, 1], 2, 2, "valid"), (0, [0, 1, 2], 3, 3, "test")]


@pytest.mark.parametrize(
    ("samples", "items", "match"),
    [
        (_samples(GOOD[:2]), None, r"The test split of .*samples.parquet is empty"),
        (_samples([*GOOD, (1, [0, 9], 1, 4, "train")]), None, r"history holds item id 9, which is not in"),
        (_samples([*GOOD, (1, [0], -1, 4, "train")]), None, r"target holds item id -1, which is not in"),
        (_samples([*GOOD, (1, [0], 1, 4, "dev")]), None, r"unknown split value\(s\) \['dev'\]"),
        (None, pd.DataFrame({"item_id": [0, 2, 3, 4, 5], "title": TITLES}), r"item_id must be the dense"),
        (None, pd.DataFrame({"item_id": range(5), "title": [*TITLES[:4], "  "]}), r"item_id 4 has an empty"),
        (None, pd.DataFrame({"item_id": range(5)}), r"lacks the column\(s\) \['title'\]"),
    ],
)
def test_bad_files_give_one_clear_sentence(tmp_path, samples, items, match):
    write_dataset(tmp_path / "bad", samples=samples, items=items)
    dm = IAMDataModule(str(tmp_path / "bad"), "tiny")
    with pytest.raises(DataFileError, match=match):
        dm.setup(None)


def test_missing_dir_and_files(tmp_path, data_dir):
    with pytest.raises(DataFileError, match=r"data_dir '.*nowhere' does not exist; run `make data-ml100k`"):
        IAMDataModule(str(tmp_path / "nowhere"), "tiny").setup("fit")
    (data_dir / "samples.parquet").unlink()
    with pytest.raises(DataFileError, match=r"samples.parquet is missing"):
        IAMDataModule(str(data_dir), "tiny").setup("fit")
    (data_dir / "items.parquet").unlink()
    with pytest.raises(DataFileError, match=r"items.parquet is missing"):
        _ = IAMDataModule(str(data_dir), "tiny").titles


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "data.batch_size must be an integer >= 1"),
        ({"max_length": -3}, "data.max_length"),
        ({"max_items": -1}, "data.max_items must be an integer >= 0"),
        ({"max_train_samples": 0}, "data.max_train_samples"),
        ({"padding_side": "top"}, "data.padding_side must be 'left' or 'right'"),
        ({"predict_split": "train"}, "data.predict_split"),
        ({"template": {"instruction": "x"}}, "data.template must be a PromptTemplate"),
    ],
)
def test_bad_arguments_are_named(data_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        IAMDataModule(str(data_dir), "tiny", **kwargs)


def test_target_positions_list_each_rows_target_tokens_in_order(data_dir):
    """The collator's (B, A) target positions: each row's positions t with a target label at t + 1, in
    order, then filler labelled -100; A rounds up to TARGET_MULTIPLE; padding rounds L up."""
    from iamrec.data.collate import TARGET_MULTIPLE

    dm = IAMDataModule(str(data_dir), "tiny", batch_size=4, pad_to_multiple_of=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    labels, positions, picked = batch["labels"], batch["target_positions"], batch["target_labels"]
    assert labels.shape[1] % 32 == 0 and positions.shape[1] % TARGET_MULTIPLE == 0
    for row in range(labels.shape[0]):
        expected = (labels[row, 1:] != -100).nonzero().view(-1)
        n = expected.numel()
        assert positions[row, :n].equal(expected)
        assert picked[row, :n].equal(labels[row, 1:][expected]) and picked[row, n:].eq(-100).all()


def test_loader_options_pin_and_keep_workers(data_dir):
    dm = IAMDataModule(str(data_dir), "tiny", num_workers=2, pin_memory=True)
    assert dm._loader_options() == {"num_workers": 2, "pin_memory": True, "persistent_workers": True}
    dm = IAMDataModule(str(data_dir), "tiny", persistent_workers=True)  # no workers: nothing to keep
    assert dm._loader_options()["persistent_workers"] is False
    assert dm._loader_options()["pin_memory"] is torch.cuda.is_available()
