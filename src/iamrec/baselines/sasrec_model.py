"""SASRec (Kang & McAuley, ICDM 2018) trained with full-softmax cross-entropy: the network and its
LightningModule (`SASRec`). Batches come from `iamrec.baselines.sasrec_data.SASRecDataModule`.

The architecture follows the original: item embeddings scaled by sqrt(d) plus learnable absolute
positional embeddings, dropout, then blocks of [LayerNorm'd queries -> causal self-attention -> residual
-> LayerNorm -> point-wise feed-forward -> residual], a final LayerNorm, and scores given by the dot
product with the (shared) item embedding table. The loss is cross-entropy over the **whole catalogue**
instead of the paper's one sampled negative: the strong "SASRec+CE" variant (Klenitskiy & Vasilev,
RecSys 2023), which is the fair non-LLM reference for full-catalogue ranking.

Notation: B batch, L = ``max_len`` history positions, H hidden size, I catalogue size. The pad id is I
and histories are left-padded (see `iamrec.baselines.sasrec_data`); pad queries attend to themselves only
(so no softmax row is empty); real items never see pads.

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
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iamrec.metrics import DEFAULT_KS, RankingMetrics


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
