"""Shared fixtures: a small processed dataset in the exact processed-data contract (data_prep/common.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

# One thread in the tests and in the processes they start: tiny models gain nothing from a second thread,
# and OpenMP's spin-waiting on a shared 2-core machine makes a tiny step ~50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TITLES = [
    "Toy Story (1995)",
    "GoldenEye (1995)",
    "Four Rooms (1995)",
    "Get Shorty (1995)",
    "Copycat (1995)",
    "Twelve Monkeys (1995)",
    "Babe (1995)",
    "Dead Man Walking (1995)",
    "Richard III (1995)",
    "Seven (Se7en) (1995)",
    "Usual Suspects, The (1995)",
    "Mighty Aphrodite (1995)",
    "Postino, Il (1994)",
    "Mr. Holland's Opus (1995)",
    "French Twist (1995)",
    "From Dusk Till Dawn (1996)",
    "Braveheart (1995)",
    "Taxi Driver (1976)",
    "Rumble in the Bronx (1995)",
    "Muppet Treasure Island (1996)",
    "Antonia's Line (1995)",
    "Babe (1995)",  # a duplicate title, as ML-100K has
]


def write_stats(root: Path, **stats) -> Path:
    """stats.json vouching (sha256 and size) for every parquet file now in `root`, as data prep writes it;
    call it again after changing a file on purpose (the loader refuses files that do not match)."""
    outputs = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
        for p in sorted(root.glob("*.parquet"))
    }
    (root / "stats.json").write_text(json.dumps({**stats, "files": {"outputs": outputs}}, indent=2) + "\n")
    return root / "stats.json"


def write_processed(root: Path, n_users: int = 16, seq_len: int = 8) -> Path:
    """Users walk the catalogue cyclically from different starts; d3-style prefixes, split by time."""
    root.mkdir(parents=True, exist_ok=True)
    n_items = len(TITLES)
    pd.DataFrame({"item_id": range(n_items), "title": TITLES}).to_parquet(root / "items.parquet", index=False)
    rows, inter = [], []
    for u in range(n_users):
        seq = [(3 * u + j) % n_items for j in range(seq_len)]
        for j, item in enumerate(seq):
            inter.append({"user_id": u, "item_id": item, "timestamp": 1000 * j + u})
        for j in range(1, seq_len):
            rows.append(
                {
                    "user_id": u,
                    "history": seq[max(0, j - 10) : j],
                    "target": seq[j],
                    "target_timestamp": 1000 * j + u,
                }
            )
    samples = pd.DataFrame(rows).sort_values("target_timestamp", kind="stable").reset_index(drop=True)
    n = len(samples)
    samples["split"] = (
        ["train"] * int(0.8 * n) + ["valid"] * (int(0.9 * n) - int(0.8 * n)) + ["test"] * (n - int(0.9 * n))
    )
    samples.to_parquet(root / "samples.parquet", index=False)
    pd.DataFrame(inter).to_parquet(root / "interactions.parquet", index=False)
    write_stats(root)
    return root


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory) -> Path:
    return write_processed(tmp_path_factory.mktemp("processed") / "toy")


@pytest.fixture(scope="module")
def one_thread():
    """A module that requests it runs single-threaded: on tiny matrices one thread avoids OpenMP
    spin-waiting on a busy 2-core machine (10x faster here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- gpu tier


def _gpu_only(config) -> bool:
    return (config.getoption("markexpr") or "").strip() == "gpu"


def pytest_configure(config) -> None:
    """`pytest -m gpu` (a GPU sitting's check): print every test's duration."""
    if _gpu_only(config) and not config.getoption("durations"):
        config.option.durations, config.option.durations_min = 0, 0.0


def pytest_ignore_collect(collection_path, config):
    """`pytest -m gpu` collects only tests/gpu/ (importing the CPU tests costs a sitting ~30 s); without
    `-m gpu`, tests/gpu/ is collected and skipped by its marker."""
    if _gpu_only(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "gpu" not in collection_path.parent.parts
    return None
