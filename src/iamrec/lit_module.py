"""The LightningModule: fine-tunes an item-aware LLM and evaluates it by constrained beam search.

Training loss: cross-entropy on the TARGET tokens only. The LM head runs only at the positions that
predict a target token — full-vocabulary logits over whole sequences would be (B, L, V) floats, gigabytes
at realistic sizes. Evaluation: beam search over the whole catalogue, constrained by a title trie; the
rank of the true item among the beams gives HR@K / NDCG@K (`iamrec.metrics`).

Notation: B batch, L sequence length, H hidden size, V vocabulary, N target tokens in the batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import pandas as pd
import torch
import torch.nn.functional as F

from iamrec.attention import apply_item_attention, describe
from iamrec.data import IGNORE_INDEX
from iamrec.metrics import RankingMetrics, rank_of_target
from iamrec.model.loading import load_backbone

# predictions.parquet: one row per test sample; top_items = the smallest item id each beam's title names
# (-1: a title outside the catalogue, impossible with the trie), invalid_beams = such beams of this sample.
_PREDICTION_COLUMNS = ["sample_index", "user_id", "target", "rank", "top_items", "invalid_beams"]


class IAMRecModule(L.LightningModule):
    """An item-aware LLM recommender (IAM) — or any schedule of attention kinds — trained with LoRA or fully.

    Args:
        backbone: Model spec: ``tiny`` (random, tests), a local folder (e.g.
            ``.assets/models/SmolLM2-135M-Instruct`` from ``make assets``) or a hub id.
        schedule: Preset (``causal``, ``iam``, ``iam_inter_first``, ``split``, ``split_inter_first``,
            ``stacked``, ``stacked_inter_first``, ``intra_only``, ``inter_only``, ``hatllm``) or one entry
            per decoder layer (kinds joined by ``+`` for stacked passes).
        backend: Attention kernel: ``sdpa`` (default), ``eager`` (reference) or ``flex`` (GPU training).
        context_visible: Every query may also see the CONTEXT tokens (instruction, response header).
        split_at: Layer at which ``split`` schedules switch kinds (default: half the layers).
        hatllm_bands: (intra layers, inter layers) of the ``hatllm`` preset (default: a third each).
        lora: Fine-tune LoRA adapters (True) or all weights (False).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: Dropout on the LoRA path.
        lora_target_modules: Modules that get adapters (HF names, so peft targets work).
        model_dtype: dtype of the base weights: ``float32`` or ``bfloat16`` (with LoRA the adapters stay
            fp32; pair with ``trainer.precision: bf16-mixed``).
        gradient_checkpointing: Recompute activations in backward (saves memory, costs ~30% time).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps (a float in (0, 1) is a fraction of the total steps).
        scheduler: Decay after warmup: ``cosine``, ``linear`` or ``constant``.
        num_beams: Beams in constrained decoding (must be >= the largest K).
        ks: Cut-offs for HR@K and NDCG@K.
        val_generate: Also decode on the validation set each epoch (slow; otherwise only target loss).
    """

    def __init__(
        self,
        backbone: str = "tiny",
        schedule: str | list[str] = "iam",
        backend: Literal["sdpa", "eager", "flex"] = "sdpa",
        context_visible: bool = True,
        split_at: int | None = None,
        hatllm_bands: tuple[int, int] | None = None,
        lora: bool = True,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        model_dtype: Literal["float32", "bfloat16"] = "float32",
        gradient_checkpointing: bool = False,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: float = 0.05,
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        num_beams: int = 20,
        ks: tuple[int, ...] = (1, 5, 10, 20),
        val_generate: bool = False,
    ) -> None:
        super().__init__()
        if num_beams < max(ks):
            raise ValueError(f"model.num_beams={num_beams} must be >= the largest K in model.ks={tuple(ks)}.")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}.")
        self.save_hyperparameters()
        self.model = build_model(
            backbone,
            schedule,
            backend,
            context_visible,
            split_at,
            hatllm_bands,
            lora,
            lora_r,
            lora_alpha,
            lora_dropout,
            lora_target_modules,
            model_dtype,
            gradient_checkpointing,
        )
        self.ks = tuple(ks)
        self._trie = None
        self._predictions: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ loss on target tokens only
    @property
    def hf_model(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def target_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hf = self.hf_model
        hidden = hf.model(  # (B, L, H); the decoder stack alone, the LM head comes below
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            segment_ids=batch["segment_ids"],
        ).last_hidden_state
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        where = labels != IGNORE_INDEX  # (B, L-1)
        logits = hf.get_output_embeddings()(hidden[:, :-1][where])  # (N, V) — only target positions
        return F.cross_entropy(logits.float(), labels[where])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.target_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.target_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        if self.hparams.val_generate:
            ranks, _ = self._rank(batch)
            self._val_rows += [
                {"sample_index": int(i), "rank": int(r)} for i, r in zip(batch["sample_index"], ranks)
            ]

    def on_validation_epoch_start(self) -> None:
        self._val_rows: list[dict[str, int]] = []

    def on_validation_epoch_end(self) -> None:
        if self.hparams.val_generate:
            # Like test: every rank gathers all rows and counts each sample once (the distributed
            # sampler repeats a few), so every rank logs the same values without a further sync.
            ranks = self._gather(self._val_rows, ["sample_index", "rank"])["rank"]
            values = self._ranking(ranks)
            self.log_dict({f"val/{k}": float(v) for k, v in values.items() if k != "users"})

    # ------------------------------------------------------------------ constrained decoding
    def _trie_for(self, datamodule):
        if self._trie is None:
            from iamrec.decoding import TitleTrie

            self._trie = TitleTrie.from_sequences(
                datamodule.answer_token_ids, self.hf_model.config.vocab_size
            )
        return self._trie

    def _rank(self, batch: dict[str, torch.Tensor]):
        from iamrec.decoding import constrained_beam_search

        trie = self._trie_for(self.trainer.datamodule)
        result = constrained_beam_search(
            self.model,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            batch["prompt_segment_ids"],
            trie,
            num_beams=self.hparams.num_beams,
        )
        beams = result.items  # per prompt: per beam, the item ids its title names
        ranks = rank_of_target(beams, batch["target"], max_k=max(self.ks)).to(self.device)
        return ranks, beams

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ranks, beams = self._rank(batch)
        for i, user_beams in enumerate(beams):
            self._predictions.append(
                {
                    "sample_index": int(batch["sample_index"][i]),
                    "user_id": int(batch["user_id"][i]),
                    "target": int(batch["target"][i]),
                    "rank": int(ranks[i]),
                    "top_items": [sorted(items)[0] if items else -1 for items in user_beams][: max(self.ks)],
                    "invalid_beams": sum(1 for items in user_beams if not items),
                }
            )

    def on_test_epoch_start(self) -> None:
        self._predictions = []

    def on_test_epoch_end(self) -> None:
        # Metrics from the gathered, de-duplicated predictions of all ranks: the distributed sampler
        # repeats a few samples so every rank gets an equal share, and those must count once.
        predictions = self._gather(self._predictions, _PREDICTION_COLUMNS)
        values: dict[str, Any] = self._ranking(predictions["rank"])
        beams = len(predictions) * self.hparams.num_beams
        values["invalid_rate"] = float(predictions["invalid_beams"].sum() / beams) if beams else 0.0
        # HF-style beam search repeats a finished answer in the slots it cannot fill (fewer than K answers
        # finish before the beams run out), so a sample's top K can name fewer than K distinct items.
        distinct = predictions["top_items"].map(lambda items: len(set(items) - {-1}))
        values["distinct_items"] = float(distinct.mean()) if len(distinct) else 0.0
        values["schedule"] = describe(self.hf_model._iam_state.schedule)
        self.log_dict(
            {f"test/{k}": v for k, v in values.items() if isinstance(v, float)}, rank_zero_only=True
        )
        log_dir = Path(self.trainer.log_dir or ".")  # a collective (broadcast): every rank asks
        if self.trainer.is_global_zero:
            write_test_outputs(log_dir, values, predictions)

    def _ranking(self, ranks: pd.Series) -> dict[str, Any]:
        """HR/NDCG@K of 0-based target ranks (-1: not in the top K); every rank holds all of them."""
        metric = RankingMetrics(self.ks, sync_on_compute=False)
        metric.update(torch.tensor(ranks.tolist(), dtype=torch.long))
        return {k: float(v) if k != "users" else int(v) for k, v in metric.compute().items()}

    def _gather(self, rows: list[dict], columns: list[str]) -> pd.DataFrame:
        """This process's rows plus every other process's, each ``sample_index`` once, in sample order."""
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            gathered: list[list[dict]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        frame = pd.DataFrame(rows, columns=columns)
        return frame.drop_duplicates("sample_index").sort_values("sample_index").reset_index(drop=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = self.hparams.warmup_steps
        warmup = int(warm * total) if 0 < warm < 1 else int(warm)
        if warmup >= total and self.hparams.scheduler != "constant":
            raise ValueError(
                f"model.warmup_steps={warm} leaves no decay: the run has only {total} optimizer steps; "
                "lower it or train longer."
            )
        kind = self.hparams.scheduler

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if kind == "constant":
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ adapter-only checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA keep only trainable weights: the base is rebuilt from `backbone` (in hparams)."""
        if self.hparams.lora:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.hparams.lora:
            missing = {k for k, _ in self.named_parameters() if _.requires_grad} - set(state_dict)
            if missing and strict:
                raise RuntimeError(
                    f"checkpoint lacks {len(missing)} adapter weights, e.g. {sorted(missing)[:3]}"
                )
            strict = False
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_model(
    backbone: str,
    schedule: str | list[str],
    backend: str,
    context_visible: bool,
    split_at: int | None,
    hatllm_bands: tuple[int, int] | None,
    lora: bool,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    lora_target_modules: list[str] | None,
    model_dtype: str,
    gradient_checkpointing: bool,
):
    """Backbone -> (LoRA) -> item-aware attention. Plain PyTorch/transformers, no Lightning."""
    model = load_backbone(
        backbone, dtype=model_dtype, attn_implementation="eager" if backend == "eager" else "sdpa"
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets
        )
        model = get_peft_model(model, config)
        for p in model.parameters():  # adapters in fp32 even on a bf16 base
            if p.requires_grad:
                p.data = p.data.float()
    apply_item_attention(
        model, schedule, backend, context_visible, split_at, hatllm_bands, config_key="model.schedule"
    )
    return model


def write_test_outputs(run_dir: Path, metrics: dict[str, Any], predictions: pd.DataFrame) -> None:
    """`test_metrics.json`, `predictions.parquet` and a printed table (DESIGN.md §5)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    predictions.to_parquet(run_dir / "predictions.parquet", index=False)
    print(format_metrics_table({"model": metrics}))
    if "distinct_items" in metrics and len(predictions):
        print(
            f"distinct catalogue items per sample in the top {len(predictions['top_items'].iloc[0])}: "
            f"{metrics['distinct_items']:.2f} on average (beam search repeats an answer in slots it cannot fill)"
        )
    print(f"wrote {run_dir / 'test_metrics.json'} and {run_dir / 'predictions.parquet'}")


def format_metrics_table(rows: dict[str, dict[str, Any]], ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """A small fixed-width table: one row per method, HR@K and NDCG@K columns."""
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    lines = [f"{'method':<14}" + "".join(f"{c:>9}" for c in cols) + f"{'users':>7}"]
    for name, m in rows.items():
        cells = "".join(f"{m.get(c, float('nan')):>9.4f}" for c in cols)
        lines.append(f"{name:<14}{cells}{int(m.get('users', 0)):>7}")
    return "\n".join(lines)
