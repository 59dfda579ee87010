"""The LightningModule: fine-tunes an item-aware LLM and evaluates it by constrained beam search.

Training loss: cross-entropy on the TARGET tokens only. The LM head runs only at the positions that
predict a target token — full-vocabulary logits over whole sequences would be (B, L, V) floats, gigabytes
at realistic sizes. Evaluation: beam search over the whole catalogue, constrained by a title trie; the
rank of the true item among the beams gives HR@K / NDCG@K (`iamrec.metrics`).

Notation: B batch, L sequence length, H hidden size, V vocabulary, N target tokens in the batch.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from iamrec.attention import ItemAttentionConfig, base_model, describe, installed_state
from iamrec.data import IGNORE_INDEX
from iamrec.data.collate import target_positions
from iamrec.data.fingerprint import CATALOGUE_KEY
from iamrec.decoding import TitleTrie, constrained_beam_search, search, top_recommendations
from iamrec.metrics import RankingMetrics, gather_samples, rank_of_target
from iamrec.model import LoraConfig, build_model
from iamrec.run_folder import LLM_PREDICTION_COLUMNS, write_test_outputs


def target_token_loss(
    hf, batch: dict[str, torch.Tensor], per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed cross-entropy, count)`` of the batch's target tokens, without a host sync; with `per_row`,
    one sum and one count per row, ``(B,)`` each (validation counts each sample once across processes).

    The LM head runs at the ``(B, A)`` positions of ``batch["target_positions"]`` (from the collator,
    `iamrec.data.collate.target_positions`) only; the filler among them carry label -100 and weigh 0
    (``ignore_index``). No boolean-mask indexing (its output size would be read from the device every step).
    A batch without those keys gets them here (on a GPU batch that reads one size from the device).
    `IAMRecModule.target_loss` compiles this function under ``model.compile``.
    """
    hidden = hf.model(  # (B, L, H); the decoder stack alone, the LM head comes below
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        segment_ids=batch["segment_ids"],
    ).last_hidden_state
    positions, labels = batch.get("target_positions"), batch.get("target_labels")
    if positions is None or labels is None:
        positions, labels = target_positions(batch["labels"])
    picked = torch.take_along_dim(hidden, positions[..., None], dim=1)  # (B, A, H)
    logits = hf.get_output_embeddings()(picked).float()  # (B, A, V)
    if per_row:
        losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return losses.sum(1), (labels != IGNORE_INDEX).sum(1)  # (B,), (B,)
    total = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (labels != IGNORE_INDEX).sum()


def _unwrapped(name: str) -> str:
    """A parameter's name without the wrappers FSDP and activation checkpointing insert in the module tree
    (the names of a full state dict have none)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


class IAMRecModule(L.LightningModule):
    """An item-aware LLM recommender (IAM) — or any schedule of attention kinds — trained with LoRA or fully.

    The model is built by `iamrec.model.build_model` in `configure_model` (Lightning calls it once the
    strategy is set up, so FSDP can shard it as it is built and DDP builds it on the device;
    `load_from_checkpoint` calls it too; a script calls ``module.configure_model()`` before using
    ``module.model``). This class adds the loss, the optimiser and the evaluation loop.

    Full fine-tuning (``lora: null``) keeps fp32 parameters (AdamW's master weights) and computes in bf16
    through ``trainer.precision: bf16-mixed``; bf16 weights would lose every update below bf16's precision,
    so ``model_dtype: bfloat16`` and ``trainer.precision: bf16-true`` are refused without LoRA. With LoRA
    the frozen base may be bf16 (the adapters stay fp32).

    Args:
        backbone: Model spec: ``tiny`` (random, tests), a local folder (e.g.
            ``.assets/models/SmolLM2-135M-Instruct`` from ``make assets``) or a hub id.
        attention: Item-aware attention settings (``model.attention.schedule``, ``.backend``,
            ``.context_visible``, ``.split_at``, ``.hatllm_bands``).
        lora: LoRA adapters (``model.lora.r``, ``.alpha``, ``.dropout``, ``.target_modules``), or ``null``
            for full fine-tuning of every weight.
        model_dtype: dtype of the base weights: ``float32`` or ``bfloat16`` (LoRA only: the frozen base;
            the adapters stay fp32; pair with ``trainer.precision: bf16-mixed``).
        gradient_checkpointing: Recompute activations in backward (saves memory, costs ~30% time).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps (a float in (0, 1) is a fraction of the total steps): the
            learning rate of step ``s < warmup`` is ``lr * (s + 1) / (warmup + 1)``.
        scheduler: Decay after warmup to 0 at the last step: ``cosine``, ``linear`` or ``constant``
            (torch's schedulers, see `configure_optimizers`).
        num_beams: Beams in constrained decoding (must be >= the largest K).
        ks: Cut-offs for HR@K and NDCG@K.
        val_generate: Also decode on the validation set each epoch (slow; otherwise only target loss).
        compile: Run the training and validation loss (decoder stack, LM head at the target positions,
            cross-entropy: `target_token_loss`) through ``torch.compile`` (speed only; the first steps
            compile, and each new padded length compiles again: pair with ``data.pad_to_multiple_of``).
            Decoding stays eager. The weights' names and checkpoints are unchanged.
    """

    def __init__(
        self,
        backbone: str = "tiny",
        attention: ItemAttentionConfig = ItemAttentionConfig(),
        lora: LoraConfig | None = LoraConfig(),
        model_dtype: Literal["float32", "bfloat16"] = "float32",
        gradient_checkpointing: bool = False,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: float = 0.05,
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        num_beams: int = 20,
        ks: tuple[int, ...] = (1, 5, 10, 20),
        val_generate: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # `load_from_checkpoint` passes the saved hparams back: plain dicts (checkpoints hold no classes).
        attention = ItemAttentionConfig(**attention) if isinstance(attention, dict) else attention
        lora = LoraConfig(**lora) if isinstance(lora, dict) else lora
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"model.ks must list cut-offs K >= 1 (e.g. [1, 5, 10, 20]), got {list(ks)!r}.")
        if num_beams < max(ks):
            raise ValueError(f"model.num_beams={num_beams} must be >= the largest K in model.ks={tuple(ks)}.")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}.")
        if lora is None and model_dtype != "float32":
            raise ValueError(
                f"model.model_dtype={model_dtype} with model.lora=null would train {model_dtype} weights "
                "(updates below its precision are lost); full fine-tuning keeps float32 weights: set "
                "model.model_dtype=float32 with trainer.precision=bf16-mixed, or train LoRA adapters."
            )
        self.save_hyperparameters(ignore=("attention", "lora"))
        self.hparams["attention"] = asdict(attention)
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self._model_settings = (backbone, attention, lora, model_dtype, gradient_checkpointing)
        self.ks = tuple(ks)
        self._trie = None
        self._compiled: dict[str, Any] = {}  # a plain dict: a compiled function is no registered submodule
        self._predictions: list[dict[str, Any]] = []

    def configure_model(self) -> None:
        """Build ``self.model`` (once: later calls do nothing).

        Lightning calls this inside the strategy's contexts: on the device under DDP, before the FSDP
        wrapping under FSDP (``trainer.strategy: fsdp`` shards each decoder layer, see `iamrec.strategy`),
        and before a checkpoint's weights are loaded (fit resume, ``test --ckpt_path``,
        `load_from_checkpoint`).
        """
        if "model" in self._modules:
            return
        backbone, attention, lora, model_dtype, gradient_checkpointing = self._model_settings
        precision = str(self._trainer.precision) if self._trainer is not None else ""
        if lora is None and precision in ("bf16-true", "16-true", "bf16", "16"):
            raise ValueError(
                f"trainer.precision={precision} with model.lora=null would train half-precision weights; "
                "use trainer.precision=bf16-mixed (float32 weights, bf16 compute) or train LoRA adapters."
            )
        self.model = build_model(backbone, attention, lora, model_dtype, gradient_checkpointing)

    # ------------------------------------------------------------------ loss on target tokens only
    @property
    def hf_model(self):
        """The transformers model (inside the peft wrapper when training LoRA)."""
        if "model" not in self._modules:
            raise RuntimeError(
                "IAMRecModule builds its model in configure_model(): call module.configure_model() first "
                "(Lightning calls it in fit, validate, test and load_from_checkpoint)."
            )
        return base_model(self.model)

    def target_loss(self, batch: dict[str, torch.Tensor], global_mean: bool = False) -> torch.Tensor:
        """Mean cross-entropy over the batch's target tokens (`target_token_loss`; no host sync).

        `global_mean`: under DDP/FSDP, divide the summed loss by the mean target-token count of all
        processes' batches instead of this batch's own: DDP averages the processes' gradients, so the
        step is then exactly the step of one process on the union of the batches (processes holding
        titles of different lengths would otherwise weigh their tokens differently).
        """
        loss_fn = target_token_loss
        if self.hparams.get("compile", False):  # compiled once, kept outside the module tree
            loss_fn = self._compiled.setdefault("loss", torch.compile(target_token_loss))
        total, count = loss_fn(self.hf_model, batch)
        count = count.to(torch.float32)
        if not (global_mean and self._trainer is not None and self.trainer.world_size > 1):
            return total / count
        import torch.distributed as dist

        dist.all_reduce(count)  # target tokens of all processes' batches
        return total * self.trainer.world_size / count

    def on_fit_start(self) -> None:
        # from_pretrained returns an eval-mode model and Lightning keeps the modes it finds at fit start
        # (restoring them after each validation), so without this the backbone trains in eval mode: no
        # dropout, LoRA dropout included.
        self.train()
        self._dropout_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Dropout draws from torch's global RNG. Reseeding it per batch from (seed, rank, epoch, batch)
        # makes the masks a function of the position in training alone: a run resumed from a checkpoint
        # draws the masks an uninterrupted run draws, whatever else used the RNG in between (a
        # validation, model building on restart); Lightning restores the epoch and batch counters.
        entropy = [self._dropout_seed % 2**63, self.global_rank, self.current_epoch, batch_idx]
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) % 2**63)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.target_loss(batch, global_mean=True)
        # sync_dist: the mean over processes of the globally normalised losses is the loss of the union.
        # prog_bar=False: the progress bar would read the loss from the GPU every step (a host sync that
        # stalls the launch queue); the logger reads it every trainer.log_every_n_steps only.
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=False, batch_size=size, sync_dist=True)
        # A number logged becomes a device tensor (a blocking copy): the learning rate only on the steps the
        # logger writes (every trainer.log_every_n_steps).
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # val/loss is logged at the epoch's end over all processes' target tokens (not a mean of means)
        # kept on the device (no host sync per step), read once at the epoch's end
        totals, counts = target_token_loss(self.hf_model, batch, per_row=True)
        self._val_losses.append((batch["sample_index"], totals.detach(), counts))
        if self.hparams.val_generate:
            ranks, _ = self._rank(batch)
            self._val_rows += [
                {"sample_index": int(i), "rank": int(r)} for i, r in zip(batch["sample_index"], ranks)
            ]

    def on_validation_epoch_start(self) -> None:
        self._val_rows: list[dict[str, int]] = []
        self._val_losses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_end(self) -> None:
        # Summed losses over summed target tokens of every sample once (the distributed sampler repeats a
        # few): the loss one process computes on the whole validation set, on every rank without a sync.
        rows = [
            {"sample_index": i, "loss_sum": t, "tokens": c}
            for index, totals, counts in self._val_losses
            for i, t, c in zip(index.tolist(), totals.tolist(), counts.tolist())
        ]
        sums = self._gather(rows, ["sample_index", "loss_sum", "tokens"])
        if len(sums):
            loss = float(sums["loss_sum"].sum() / max(int(sums["tokens"].sum()), 1))
            self.log("val/loss", loss, prog_bar=True)
        if self.hparams.val_generate:
            # Like test: every rank gathers all rows and counts each sample once (the distributed
            # sampler repeats a few), so every rank logs the same values without a further sync.
            ranks = self._gather(self._val_rows, ["sample_index", "rank"])["rank"]
            values = self._ranking(ranks)
            self.log_dict({f"val/{k}": float(v) for k, v in values.items() if k != "users"})

    # ------------------------------------------------------------------ constrained decoding
    def _trie_for(self, datamodule):
        if self._trie is None:
            self._trie = TitleTrie.from_sequences(
                datamodule.answer_token_ids, self.hf_model.config.vocab_size
            )
        return self._trie

    def _rank(self, batch: dict[str, torch.Tensor]):
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
        predictions = self._gather(self._predictions, list(LLM_PREDICTION_COLUMNS))
        values: dict[str, Any] = self._ranking(predictions["rank"])
        beams = len(predictions) * self.hparams.num_beams
        values["invalid_rate"] = float(predictions["invalid_beams"].sum() / beams) if beams else 0.0
        # HF-style beam search repeats a finished answer in the slots it cannot fill (fewer than K answers
        # finish before the beams run out), so a sample's top K can name fewer than K distinct items.
        distinct = predictions["top_items"].map(lambda items: len(set(items) - {-1}))
        values["distinct_items"] = float(distinct.mean()) if len(distinct) else 0.0
        state = installed_state(self.model)
        values["schedule"] = describe(state.schedule, state.added)
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
        return gather_samples(rows, columns)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """AdamW (``model.lr``, ``model.weight_decay``) over the trainable parameters, stepped per optimizer
        step by torch's schedulers: `LinearLR` warmup from ``lr / (warmup + 1)`` to ``lr`` over
        ``model.warmup_steps``, then `CosineAnnealingLR` / `LinearLR` to 0 at the last step, or constant.

        The run's optimizer and schedule are always these: the `iamrec` command refuses LightningCLI's
        ``--optimizer`` / ``--lr_scheduler`` (`iamrec.cli`), so no setting is dropped silently.
        """
        from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

        params = [p for p in self.parameters() if p.requires_grad]
        # fused: one kernel for all parameters on CUDA (a large share of a 135M full fine-tuning step)
        fused = all(p.is_cuda for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused or None
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = self.hparams.warmup_steps
        warmup = int(warm * total) if 0 < warm < 1 else int(warm)
        kind = self.hparams.scheduler
        if warmup >= total and kind != "constant":
            raise ValueError(
                f"model.warmup_steps={warm} leaves no decay: the run has only {total} optimizer steps; "
                "lower it or train longer."
            )
        if kind == "cosine":
            decay = CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=0.0)
        elif kind == "linear":
            decay = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total - warmup)
        else:
            decay = ConstantLR(optimizer, factor=1.0, total_iters=0)
        scheduler = decay
        if warmup > 0:
            ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
            scheduler = SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ adapter-only checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA keep only trainable weights: the base is rebuilt from `backbone` (in hparams). Every
        checkpoint records the fingerprint of the catalogue it was trained on (`iamrec.data.fingerprint`)."""
        record = getattr(self._trainer.datamodule if self._trainer is not None else None, "catalogue", None)
        if record:
            checkpoint[CATALOGUE_KEY] = record
        if self.hparams.lora:
            trainable = {_unwrapped(n) for n, p in self.named_parameters() if p.requires_grad}
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

    # ------------------------------------------------------------------ predict: recommendations
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Each prompt's distinct catalogue answers, best first (`iamrec.recommend`); the CLI's
        `iamrec.predict.RecommendationWriter` keeps the top K and writes recommendations.jsonl."""
        dm = self.trainer.datamodule
        result = search(self.model, batch, self._trie_for(dm), self.hparams.num_beams)
        return {
            "sample_index": batch["sample_index"].tolist(),
            # plain dicts: Lightning moves step outputs through apply_to_collection (no frozen dataclasses)
            "recommendations": [
                [r.as_dict() for r in recs] for recs in top_recommendations(result, dm.titles)
            ],
        }
