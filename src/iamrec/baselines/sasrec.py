"""SASRec (Kang & McAuley, ICDM 2018) trained with full-softmax cross-entropy, behind iamrec's data/metrics.

The architecture follows the original: item embeddings scaled by sqrt(d) plus learnable absolute
positional embeddings, dropout, then blocks of [LayerNorm'd queries -> causal self-attention -> residual
-> LayerNorm -> point-wise feed-forward -> residual], a final LayerNorm, and scores given by the dot
product with the (shared) item embedding table. The loss is cross-entropy over the **whole catalogue**
instead of the paper's one sampled negative: the strong "SASRec+CE" variant (Klenitskiy & Vasilev,
RecSys 2023), which is the fair non-LLM reference for full-catalogue ranking.

Notation: B batch, L = ``max_len`` history positions, H hidden size, I catalogue size.

Data conventions:
- **Padding id = I** (``num_items``): item ids stay dense 0..I-1 as in the data contract, the embedding
  table has I+1 rows and the pad row is never scored.
- Histories are **left-padded** to L and truncated to their last L items, so position L-1 always holds
  the most recent item and the prediction for a sample is read there.
- Pad queries attend to themselves only (so no softmax row is empty); real items never see pads.

Training objective (``train_objective``):
- ``"last"`` (default): one cross-entropy term per train sample, predicting its target from the last
  position. Under the d3 protocol every prefix of a user is already a sample, so this is the same signal
  as SASRec's every-position loss without counting early items many times.
- ``"all"``: SASRec's original every-position loss on ``history + [target]`` (position t predicts item
  t+1). Useful for leave-one-out data, which holds one train sample per user.

Evaluation ranks the full catalogue for each valid/test sample (no negative sampling); history items are
kept unless ``exclude_history=True``. Ranks go to :class:`iamrec.metrics.RankingMetrics`, whose summed
states torchmetrics reduces across processes before ``compute()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from iamrec.cli_base import RunFolderCLI, run_cli
from iamrec.data.dataset import eval_subset_rows, load_items, load_samples
from iamrec.metrics import DEFAULT_KS, RankingMetrics, gather_samples
from iamrec.run_folder import PREDICTION_COLUMNS, add_run_checkpoint, write_test_outputs

# --------------------------------------------------------------------------------------------- data


def left_pad(histories: Sequence[Sequence[int]], max_len: int, pad_id: int) -> np.ndarray:
    """(N, max_len) int64: each history's last ``max_len`` items, right-aligned, ``pad_id`` before."""
    out = np.full((len(histories), max_len), pad_id, dtype=np.int64)
    for row, hist in enumerate(histories):
        hist = np.asarray(hist, dtype=np.int64)[-max_len:]
        if len(hist):
            out[row, max_len - len(hist) :] = hist
    return out


class PaddedSamples(Dataset):
    """Samples as padded tensors; fetched a whole batch at a time through ``__getitems__``.

    ``sample_index`` is each sample's row in samples.parquet (default: 0..N-1 of ``samples``), carried into
    the batches so test predictions name the same rows as the LLM's ``predictions.parquet``.
    """

    def __init__(
        self, samples: pd.DataFrame, max_len: int, pad_id: int, sample_index: np.ndarray | None = None
    ) -> None:
        self.pad_id = pad_id
        rows = np.arange(len(samples)) if sample_index is None else np.asarray(sample_index, dtype=np.int64)
        self.sample_index = torch.from_numpy(rows.astype(np.int64))  # (N,)
        self.user_id = torch.tensor(samples["user_id"].to_numpy(np.int64))  # (N,)
        self.target = torch.tensor(samples["target"].to_numpy(np.int64))  # (N,)
        self.history = torch.from_numpy(left_pad(samples["history"].tolist(), max_len, pad_id))  # (N, L)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        # Batched indexing: one gather per tensor instead of a Python collate over B dicts.
        idx_t = torch.as_tensor(idx)
        history = self.history[idx_t]  # (B, L)
        # Drop the leading columns that are padding in every row (d3 histories hold <= 10 of the 50
        # positions): the model's output is unchanged, since positions count back from the most recent item
        # and pads are masked, and a batch of short histories costs a fifth.
        real = (history != self.pad_id).any(dim=0)  # (L,)
        first = int(real.int().argmax()) if bool(real.any()) else history.shape[1] - 1
        return {
            "sample_index": self.sample_index[idx_t],
            "user_id": self.user_id[idx_t],
            "history": history[:, first:],
            "target": self.target[idx_t],
        }


def _batch_as_is(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    # `PaddedSamples.__getitems__` already returns a batch; module-level so workers can pickle it.
    return batch


class SASRecDataModule(L.LightningDataModule):
    """Serves ``samples.parquet`` of a processed dataset as left-padded history batches for SASRec.

    Batches are dicts: ``history`` (B, max_len) int64 padded with ``num_items``, ``target`` (B,),
    ``user_id`` (B,). Train batches are shuffled (seed with ``lightning.seed_everything``); valid/test
    batches keep file order. ``predict`` serves the test split.

    Args:
        data_dir: processed dataset folder, e.g. ``data/processed/ml-100k``.
        max_len: history positions kept (most recent items); must not exceed the model's ``max_len``.
        batch_size: samples per training batch.
        num_workers: DataLoader worker processes.
        eval_batch_size: samples per valid/test batch (defaults to ``batch_size``).
        max_eval_samples: evaluate on a fixed seeded subset of this many valid/test samples, the rows
            :func:`iamrec.data.eval_subset_rows` picks for every method (same rows for the same ``seed``),
            so SASRec is scored on the same users as the LLM cells (None: all).
        seed: seeds the evaluation subset (the training shuffle follows ``seed_everything``).
        full_validation: validate (and early-stop) on the whole valid split even when
            ``max_eval_samples`` subsets the test split; validation is cheap for SASRec and a few dozen
            users make a noisy stopping signal.
    """

    def __init__(
        self,
        data_dir: str,
        max_len: int = 50,
        batch_size: int = 256,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        full_validation: bool = False,
    ) -> None:
        super().__init__()
        if max_len < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError("SASRecDataModule: need max_len >= 1, batch_size >= 1 and num_workers >= 0.")
        if max_eval_samples is not None and max_eval_samples < 1:
            raise ValueError(f"data.max_eval_samples must be >= 1 or None, got {max_eval_samples}.")
        self.data_dir = data_dir
        self.max_len = max_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_eval_samples, self.seed = max_eval_samples, seed
        self.full_validation = full_validation
        self._num_items: int | None = None
        self.datasets: dict[str, PaddedSamples] = {}

    @property
    def num_items(self) -> int:
        """Catalogue size I, read once from ``items.parquet`` (also the padding id)."""
        if self._num_items is None:
            self._num_items = len(load_items(self.data_dir))
        return self._num_items

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        samples = load_samples(self.data_dir, self.num_items)
        for split in ("train", "valid", "test"):
            if split == "train" or (split == "valid" and self.full_validation):
                rows = samples.rows(split)
            else:
                rows = eval_subset_rows(samples, split, self.max_eval_samples, self.seed)
            part = samples.frame(rows)
            self.datasets[split] = PaddedSamples(part, self.max_len, self.num_items, sample_index=rows)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset, sampler = self.datasets[split], None
        if split != "train" and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default DistributedSampler pads the last shard by repeating samples, which would
            # count some users twice; this one splits the samples exactly (shards differ by at most one
            # batch, safe here because SASRec has no buffers for DDP to sync in evaluation). Lightning
            # keeps a sampler that is already distributed.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_batch_as_is,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


# -------------------------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    """Multi-head attention; queries come from the normalised stream, keys/values from the raw one."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.kv_proj = nn.Linear(hidden_size, 2 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries: Tensor, keys: Tensor, visible: Tensor) -> Tensor:
        """queries, keys: (B, L, H); visible: (B, 1, L, L) bool, True where q may see k."""
        b, n, h = queries.shape
        split = lambda x: x.view(b, n, self.num_heads, h // self.num_heads).transpose(1, 2)  # noqa: E731
        q = split(self.q_proj(queries))  # (B, nh, L, H/nh)
        k, v = (split(t) for t in self.kv_proj(keys).chunk(2, dim=-1))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p)  # (B, nh, L, H/nh)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h))


class SASRecBlock(nn.Module):
    """One SASRec block: LN'd queries -> attention -> residual -> LN -> feed-forward -> residual."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.attn = CausalSelfAttention(hidden_size, num_heads, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        # The paper's "point-wise" FFN: two width-H linear maps (1x1 convolutions in the original).
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, visible: Tensor, keep: Tensor) -> Tensor:
        """x: (B, L, H); visible: (B, 1, L, L); keep: (B, L, 1) float, 0 at pads."""
        q = self.attn_norm(x)
        # As in the original code the residual adds the *normalised* queries.
        x = q + self.attn_dropout(self.attn(q, x, visible))
        x = self.ffn_norm(x)
        x = x + self.ffn(x)
        return x * keep  # pads stay zero so they never leak through keys/values


class SASRec(L.LightningModule):
    """SASRec with full-catalogue cross-entropy; validates and tests by full-catalogue top-K ranking.

    Args:
        num_items: catalogue size I. ``None``: read in ``setup()`` from the trainer's datamodule
            (``trainer.datamodule.num_items``) and stored in the hyperparameters, so checkpoints reload.
        hidden_size: embedding / model width H (must be divisible by ``num_heads``).
        num_blocks: self-attention blocks.
        num_heads: attention heads per block.
        dropout: dropout on embeddings, attention weights, attention output and feed-forward.
        max_len: positional embeddings, i.e. the longest history the model reads.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay (0 gives plain Adam, as in the paper).
        ks: cut-offs K for HR@K / NDCG@K; the top-max(ks) list is scored.
        train_objective: ``"last"`` (one loss term per sample, at the last position) or ``"all"``
            (every position of history + target), see the module docstring.
        exclude_history: at evaluation, never recommend an item from the sample's own history.
    """

    def __init__(
        self,
        num_items: int | None = None,
        hidden_size: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        max_len: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ks: Sequence[int] = DEFAULT_KS,
        train_objective: Literal["last", "all"] = "last",
        exclude_history: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"SASRec: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})."
            )
        if num_blocks < 1 or max_len < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError("SASRec: need num_blocks >= 1, max_len >= 1 and 0 <= dropout < 1.")
        if train_objective not in ("last", "all"):
            raise ValueError(f"SASRec: train_objective must be 'last' or 'all'; got {train_objective!r}.")
        if num_items is not None and num_items < 1:
            raise ValueError(f"SASRec: num_items must be positive; got {num_items}.")
        self.save_hyperparameters()
        self.ks = tuple(sorted(int(k) for k in ks))
        self.val_metrics = RankingMetrics(self.ks)
        self.test_metrics = RankingMetrics(self.ks)
        self.num_items: int | None = None
        self.test_predictions: list[dict[str, Tensor]] = []  # per test batch, this process only
        self.test_results: dict[str, float | int] = {}  # RankingMetrics.compute() of the last test run
        if num_items is not None:
            self._build(num_items)

    # --- construction -------------------------------------------------------------------------------

    def _build(self, num_items: int) -> None:
        hp = self.hparams
        self.num_items = num_items
        self.hparams["num_items"] = num_items  # so a checkpoint rebuilds without a datamodule
        self.item_emb = nn.Embedding(num_items + 1, hp.hidden_size, padding_idx=num_items)
        self.pos_emb = nn.Embedding(hp.max_len, hp.hidden_size)
        self.emb_dropout = nn.Dropout(hp.dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(hp.hidden_size, hp.num_heads, hp.dropout) for _ in range(hp.num_blocks)
        )
        self.final_norm = nn.LayerNorm(hp.hidden_size, eps=1e-8)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier for matrices as in the reference PyTorch port; keep LayerNorm at 1/0, pad row at 0.
        for name, p in self.named_parameters():
            if p.dim() > 1 and "norm" not in name:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[self.num_items].zero_()

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.num_items is None:
            if dm is None or not hasattr(dm, "num_items"):
                raise ValueError(
                    "SASRec: num_items is None and the trainer has no datamodule with `num_items`; "
                    "pass num_items or use SASRecDataModule."
                )
            self._build(int(dm.num_items))
        if dm is not None and getattr(dm, "max_len", 0) > self.hparams.max_len:
            raise ValueError(
                f"SASRec: data.max_len ({dm.max_len}) exceeds model.max_len ({self.hparams.max_len}); "
                "set them equal (the CLI links them)."
            )

    # --- forward ------------------------------------------------------------------------------------

    def encode(self, history: Tensor) -> Tensor:
        """history: (B, L) item ids left-padded with ``num_items`` -> (B, L, H) hidden states."""
        if self.num_items is None:
            raise RuntimeError("SASRec: the model is not built yet (num_items unknown); call setup first.")
        b, n = history.shape
        if n > self.hparams.max_len:
            raise ValueError(f"SASRec: history length {n} exceeds max_len {self.hparams.max_len}.")
        is_item = history != self.num_items  # (B, L)
        # Positions count so that the most recent item is always max_len-1 (histories are left-padded).
        pos = torch.arange(self.hparams.max_len - n, self.hparams.max_len, device=history.device)  # (L,)
        x = self.item_emb(history) * math.sqrt(self.hparams.hidden_size) + self.pos_emb(pos)  # (B, L, H)
        keep = is_item.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        x = self.emb_dropout(x) * keep
        causal = torch.ones(n, n, dtype=torch.bool, device=history.device).tril()  # (L, L)
        eye = torch.eye(n, dtype=torch.bool, device=history.device)
        visible = (causal & (is_item[:, None, :] | eye)).unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, visible, keep)
        return self.final_norm(x)

    def item_scores(self, hidden: Tensor) -> Tensor:
        """(..., H) hidden states -> (..., I) scores against every real item (pad row excluded)."""
        return hidden @ self.item_emb.weight[: self.num_items].T

    def forward(self, history: Tensor) -> Tensor:
        """history: (B, L) -> (B, I) next-item scores from the last position."""
        return self.item_scores(self.encode(history)[:, -1])

    # --- steps --------------------------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the full catalogue for one batch (see ``train_objective``)."""
        history, target = batch["history"], batch["target"]
        hidden = self.encode(history)  # (B, L, H)
        if self.hparams.train_objective == "last":
            loss = F.cross_entropy(self.item_scores(hidden[:, -1]), target)
        else:
            # Position t predicts the item at t+1; the last position predicts the target. Pad inputs
            # carry no label (left padding means the next position of a real item is never a pad).
            labels = torch.cat([history[:, 1:], target[:, None]], dim=1)  # (B, L)
            labels = labels.masked_fill(history == self.num_items, -100)
            logits = self.item_scores(hidden)  # (B, L, I)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    @torch.no_grad()
    def rank_targets(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Full-catalogue top-K for a batch -> (top items (B, K), 0-based target rank (B,) or -1)."""
        history, target = batch["history"], batch["target"]
        scores = self(history)  # (B, I)
        if self.hparams.exclude_history:
            # Scatter into I+1 columns so the pad id has a column to land in, then drop it.
            blocked = torch.zeros(scores.shape[0], self.num_items + 1, dtype=torch.bool, device=scores.device)
            blocked.scatter_(1, history, True)
            scores = scores.masked_fill(blocked[:, : self.num_items], float("-inf"))
        k = min(max(self.ks), self.num_items)
        top = scores.topk(k, dim=1).indices  # (B, K)
        match = top == target[:, None]  # (B, K)
        rank = torch.where(match.any(dim=1), match.int().argmax(dim=1), -1)  # (B,)
        return top, rank

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_metrics.update(self.rank_targets(batch)[1])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        top, rank = self.rank_targets(batch)
        self.test_metrics.update(rank)
        # Per-sample ranks of this process, for predictions.parquet (the caller gathers across ranks).
        self.test_predictions.append(
            {
                "sample_index": batch["sample_index"].cpu(),
                "user_id": batch["user_id"].cpu(),
                "target": batch["target"].cpu(),
                "rank": rank.cpu(),
                "top_items": top.cpu(),
            }
        )

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        top, rank = self.rank_targets(batch)
        return {"user_id": batch["user_id"], "target": batch["target"], "top_items": top, "rank": rank}

    def _log_ranking(self, metrics: RankingMetrics, prefix: str) -> dict[str, float | int]:
        # compute() already reduced the summed states over all processes, so every rank logs the same
        # value; sync_dist=True only keeps Lightning's epoch-level DDP check quiet.
        out = metrics.compute()
        values = {f"{prefix}/{k}": float(v) for k, v in out.items() if k != "users"}
        self.log_dict(values, sync_dist=True, prog_bar=False)
        self.log(f"{prefix}/users", float(out["users"]), sync_dist=True)
        metrics.reset()
        return out

    def on_validation_epoch_end(self) -> None:
        self._log_ranking(self.val_metrics, "val")

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_ranking(self.test_metrics, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Adam with betas (0.9, 0.98) as in the paper; AdamW only decoupled when weight_decay > 0.
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.98), weight_decay=self.hparams.weight_decay
        )


# ---------------------------------------------------------------------------------------------- CLI


class SASRecCLI(RunFolderCLI):
    """``python -m iamrec.baselines.sasrec``: SASRec + SASRecDataModule, with iamrec's run-folder layout and
    checkpoint rules (``--ckpt_path last``, checked checkpoints; see `iamrec.cli_base`)."""

    program = "iamrec.baselines.sasrec"

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.max_len", "model.max_len")
        # As in `iamrec`: <default_root_dir>/checkpoints/last.ckpt (resume, test from a new process), plus
        # the best epoch by validation NDCG@10 as best-*.ckpt (what the table evaluates).
        add_run_checkpoint(parser, save_top_k=1, monitor="val/NDCG@10", mode="max", filename="best-{epoch}")

    def after_test(self) -> None:
        """Write ``test_metrics.json`` and ``predictions.parquet`` (all processes' rows) to the log dir."""
        model: SASRec = self.model
        # one row per sample of this process (top_items: its list of K items), then every process's
        rows = [
            dict(zip(PREDICTION_COLUMNS, values))
            for part in model.test_predictions
            for values in zip(*(part[k].tolist() for k in PREDICTION_COLUMNS))
        ]
        frame = gather_samples(rows, PREDICTION_COLUMNS)
        log_dir = Path(self.trainer.log_dir or ".")
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) if k != "users" else int(v) for k, v in model.test_results.items()}
        metrics["invalid_rate"] = 0.0  # a ranking over the catalogue never names a non-item
        write_test_outputs(log_dir, metrics, frame, method="sasrec")


def main(args: list[str] | None = None) -> None:
    """Expected failures: one sentence and exit status 2; anything else keeps its traceback (`iamrec.errors`)."""
    run_cli(SASRecCLI, SASRec, SASRecDataModule, args)


if __name__ == "__main__":
    main()
