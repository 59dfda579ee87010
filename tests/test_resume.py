"""A killed `iamrec fit` resumed with `--ckpt_path last` ends exactly where an uninterrupted run ends.

The strict case: LoRA with dropout 0.2 (the masks come from torch's RNG) on the tiny config, 5 batches per
epoch so the resumed stretch crosses epoch boundaries (the shuffled order of every epoch must come back),
a validation every 5 steps between the checkpoints (every 3 steps). Equality is exact (`torch.equal`, loss
`==`): both runs execute the same float operations in the same order on the same CPU with the same thread
count (OMP_NUM_THREADS=1 for both), so anything short of bit-identity means a different batch or mask.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

IAMREC = [sys.executable, "-m", "iamrec.cli"]
STEPS, EVERY = 30, 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fit_args(processed_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config=configs/tiny.yaml",
        f"--data.data_dir={processed_dir}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={STEPS}",
        "--trainer.val_check_interval=5",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={root}",
        "--data.max_train_samples=40",  # 5 batches of 8 per epoch
        "--data.max_eval_samples=4",
        f"--checkpoint.every_n_train_steps={EVERY}",
        "--model.lora.r=4",
        "--model.lora.dropout=0.2",
        "--model.warmup_steps=2",
        "--seed_everything=3",
        *extra,
    ]


def losses(root: Path) -> dict[int, float]:
    """train/loss by step, over every version (the killed run's and the resumed run's logs)."""
    out: dict[int, float] = {}
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def test_killed_fit_resumes_to_the_same_weights_and_loss(processed_dir, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen(
        IAMREC + fit_args(processed_dir, full),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        IAMREC + fit_args(processed_dir, killed),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last.ckpt"
    seen, killed_at, deadline = None, 0, time.time() + 240
    while victim.poll() is None and time.time() < deadline:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp is not None and stamp != seen:  # a new checkpoint (atomic: never a partial file)
            seen, killed_at = stamp, step_of(last)
            if killed_at >= 2 * EVERY:  # past an epoch boundary, mid-epoch (6 = epoch 1, batch 1)
                victim.send_signal(signal.SIGKILL)  # no chance to clean up, as with a lost machine
                break
        time.sleep(0.005)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = step_of(last)
    assert 2 * EVERY <= killed_at < STEPS

    resumed = subprocess.run(
        IAMREC + fit_args(processed_dir, killed, "--ckpt_path=last"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {last} at step {killed_at}" in resumed.stderr
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-3000:]

    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    b = torch.load(last, weights_only=True, map_location="cpu")
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys() and all("lora_" in k for k in a["state_dict"])
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    print(f"killed at step {killed_at} of {STEPS}; max |weight difference| {diff}")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), diff
    la, lb = losses(full), losses(killed)
    after = [s for s in sorted(la) if s >= killed_at]
    assert after and max(after) == STEPS - 1  # Lightning logs step s for the (s+1)-th optimizer step
    print(f"final training loss: uninterrupted {la[STEPS - 1]!r}, killed + resumed {lb[STEPS - 1]!r}")
    assert [lb[s] for s in after] == [la[s] for s in after]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(args: list[str]) -> None:
    from iamrec.cli import main

    main(args)


def test_bucketed_resume_mid_epoch_and_at_epoch_end_is_exact(processed_dir, tmp_path, one_thread):
    """In-process, length bucketing: resuming from intermediate checkpoints of a run (steps 4 and 6:
    mid-epoch, before and after an epoch boundary; step 10: an epoch's last batch) ends with that run's
    final weights, bit for bit; and so does resuming twice, first at an epoch's last batch (10), then from
    a checkpoint the resumed run wrote inside the next epoch (12)."""
    extra = ["--data.bucket_by_length=true", "--checkpoint.every_n_train_steps=2", "--trainer.max_steps=13"]
    extra += ["--checkpoint.save_top_k=-1", "--trainer.logger=false"]
    full = tmp_path / "full"
    _fit(fit_args(processed_dir, full, *extra))
    final = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == 13  # the final step is saved whatever the interval

    def resumed(name: str, ckpt: Path) -> Path:
        root = tmp_path / name
        (root / "checkpoints").mkdir(parents=True)
        (root / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
        _fit(fit_args(processed_dir, root, *extra, "--ckpt_path=last"))
        again = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert again["global_step"] == 13
        assert all(
            torch.equal(final["state_dict"][k], again["state_dict"][k]) for k in final["state_dict"]
        ), name
        return root

    by_step = {step_of(p): p for p in (full / "checkpoints").glob("epoch=*.ckpt")}
    for step in (4, 6, 10):
        root = resumed(f"from{step}", by_step[step])
    # the run resumed at step 10 wrote step 12 (2 batches into the next epoch): resume from that one
    twice = {step_of(p): p for p in (root / "checkpoints").glob("epoch=*.ckpt")}
    resumed("from10then12", twice[12])


# ----------------------------------------------------------------------------- the samplers alone


def test_resumable_batch_sampler_continues_mid_epoch_and_next_epochs():
    from iamrec.data.sampler import LengthGroupedBatchSampler, ResumableBatchSampler, SeededRandomSampler

    lengths = [int(x) for x in torch.randint(5, 50, (23,), generator=torch.Generator().manual_seed(0))]
    for make in (
        lambda resume=None: ResumableBatchSampler(SeededRandomSampler(range(23), 7), 4, False, resume),
        lambda resume=None: LengthGroupedBatchSampler(
            SeededRandomSampler(range(23), 7), 4, False, lengths, 7, 2, resume_at=resume
        ),
    ):
        straight = make()
        epochs = []
        for epoch in range(3):
            straight.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
            epochs.append(list(straight))
        assert epochs[0] != epochs[1] != epochs[2] and len(epochs[0]) == len(straight) == 6
        assert all(sorted(i for b in e for i in b) == list(range(23)) for e in epochs)
        # resumed at (epoch 1, 2 batches done): the rest of epoch 1, then epoch 2 as in the straight run
        resumed = make((1, 2))
        resumed.sampler.set_epoch(0)  # Lightning may iterate before it sets the epoch: resume_at wins
        assert list(resumed) == epochs[1][2:]
        resumed.sampler.set_epoch(2)
        assert list(resumed) == epochs[2]


def test_ddp_reinjection_keeps_the_resume_position(processed_dir):
    """Lightning re-creates the batch sampler around a DistributedSampler from its saved init arguments:
    `resume_at` survives, and each rank skips the same number of its own batches."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from iamrec.data import IAMDataModule

    for bucket in (False, True):
        dm = IAMDataModule(
            str(processed_dir), "tiny", batch_size=4, bucket_by_length=bucket, max_train_samples=40
        )
        dm.setup("fit")
        dm._resume = {**dm._order_key(dm.datasets["train"]), "epoch": 1, "batches_done": 2}
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = dm.train_dataloader()  # as Lightning calls the hook
        for rank in range(2):
            dist = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            ddp = _update_dataloader(loader, dist, mode=RunningStage.TRAINING)
            assert ddp.batch_sampler.resume_at == (1, 2) and ddp.batch_sampler.sampler is dist
            dist.set_epoch(1)
            full = [list(b) for b in type(ddp.batch_sampler)(**_init_args(ddp.batch_sampler, resume_at=None))]
            assert [list(b) for b in ddp.batch_sampler] == full[2:] and dist.epoch == 1


def _init_args(batch_sampler, **override):
    names = ["sampler", "batch_size", "drop_last", "seed"]
    if hasattr(batch_sampler, "lengths"):
        names += ["lengths", "mega_batch_factor"]
    return {**{n: getattr(batch_sampler, n) for n in names}, **override}


def test_a_checkpoint_of_another_training_order_is_refused(processed_dir):
    from iamrec.data import IAMDataModule

    dm = IAMDataModule(str(processed_dir), "tiny", batch_size=4, max_train_samples=40)
    dm.setup("fit")
    dm.load_state_dict({"train_order": {**dm._order_key(dm.datasets["train"]), "batch_size": 8, "epoch": 0}})
    with pytest.raises(ValueError, match=r"another training order \(data.batch_size: 8 there, 4 now\)"):
        dm.train_dataloader()
