"""Training throughput (samples/s, tokens/s) on real ML-100K prompts, item-aware schedules against causal.

    python benchmarks/bench_train.py --model .assets/models/SmolLM2-135M-Instruct --batch 8 --steps 6
    python benchmarks/bench_train.py --device cuda --precision bf16-mixed --batch 256 --steps 20   # GPU

One model, the LightningModule's own loss (`IAMRecModule.target_loss`: the LM head on target positions
only) on batches from `IAMDataModule` (the real prompts, length-bucketed like training), AdamW (fused on
CUDA). The schedules take turns on the same batches — step k runs every schedule on batch k — so drift
of the machine (clock, other load) hits all of them alike, and which schedule meets a batch first turns
every batch (the first step on a new sequence length can cost more: on an H200 `causal`, always first,
measured 2x `iam`); the figure per schedule is the median step, with the medians of its steps that met
their batch first and of the others beside it.
Prints samples/s, (non-pad) tokens/s and each schedule's step time over `causal`'s. Full fine-tuning by
default (`--lora R` for LoRA adapters of rank R).

`--compare` runs each schedule twice per batch: ``today`` — the step as it was before the sync-free loss
(the LM head on ``hidden[where]``, boolean-mask indexing, batches padded to the longest, the loss read
with ``.item()`` every step as the progress bar did) — and ``new`` — `IAMRecModule.target_loss` on
batches padded to ``--pad-to`` (the collator's target positions, no host read; ``--compile``:
``model.compile``) — and prints new/today samples/s:

    python benchmarks/bench_train.py --compare --batch 64 256 --steps 20 --pad-to 64 --compile  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from iamrec.attention import ItemAttentionConfig, apply_item_attention
from iamrec.data import IGNORE_INDEX, IAMDataModule
from iamrec.lit_module import IAMRecModule
from iamrec.model import LoraConfig


def batches(args, batch_size: int, pad_to: int | None = None) -> list[dict[str, torch.Tensor]]:
    dm = IAMDataModule(
        args.data,
        args.model,
        batch_size=batch_size,
        max_length=args.max_length,
        bucket_by_length=True,
        max_train_samples=batch_size * (args.steps + args.warmup),
        num_workers=0,
        pad_to_multiple_of=pad_to,
    )
    dm.setup("fit")
    keys = ("input_ids", "attention_mask", "segment_ids", "labels", "target_positions", "target_labels")
    return [
        {k: b[k].to(args.device, non_blocking=True) for k in keys}
        for b in itertools.islice(dm.train_dataloader(), args.steps + args.warmup)
    ]


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".assets/models/SmolLM2-135M-Instruct")
    p.add_argument("--data", default="data/processed/ml100k")
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="batch size(s), measured in turn")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="timed steps per schedule")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per schedule first")
    p.add_argument("--schedules", nargs="+", default=["causal", "iam"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true",
                   choices=["32-true", "bf16-mixed"])  # fmt: skip
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--compile", action="store_true", help="model.compile: torch.compile the loss (new path)")
    p.add_argument("--compare", action="store_true", help="today's step and the new one on the same batches")
    p.add_argument("--pad-to", type=int, default=None, help="data.pad_to_multiple_of of the new path")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


@dataclass
class Trainer:
    """The module in training mode, its optimizer and the autocast context of ``--precision``."""

    module: IAMRecModule
    opt: torch.optim.Optimizer
    autocast: contextlib.AbstractContextManager


def build_trainer(args: argparse.Namespace) -> Trainer:
    """The LightningModule (full fine-tuning or ``--lora``) on ``--device``, AdamW (fused on CUDA)."""
    module = IAMRecModule(
        args.model,
        ItemAttentionConfig("causal"),
        LoraConfig(r=args.lora) if args.lora else None,
        compile=args.compile,
    )
    module.configure_model()
    module.to(args.device)
    module.train()
    params = [q for q in module.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=args.device.startswith("cuda"))
    autocast = (
        torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    return Trainer(module, opt, autocast)


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so that a clock read after it times the work itself."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(
    args: argparse.Namespace,
    trainer: Trainer,
    variants: list[tuple[str, str, str]],
    data: list[dict[str, torch.Tensor]],
    old_data: list[dict[str, torch.Tensor]],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every variant steps on every batch in turn; {label: seconds per timed step}, and of those the
    steps that met their batch first."""
    module, opt = trainer.module, trainer.opt
    labels = [v[0] for v in variants]
    times: dict[str, list[float]] = {s: [] for s in labels}
    first: dict[str, list[float]] = {s: [] for s in labels}  # steps that met a new batch first
    for i, batch in enumerate(data):
        # the order turns every batch: the first step on a new batch (a new sequence length) can cost
        # more (allocator, kernel plans), and it must not always fall on the same schedule
        shift = i % len(variants)
        for j, (label, schedule, path) in enumerate(variants[shift:] + variants[:shift]):
            apply_item_attention(module.model, config=ItemAttentionConfig(schedule))
            sync(args.device)
            start = time.perf_counter()
            with trainer.autocast:
                loss = module.target_loss(batch) if path == "new" else _today_loss(module, old_data[i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if path == "today":
                loss.item()  # the progress bar's read of train/loss, every step
            sync(args.device)
            if i >= args.warmup:
                times[label].append(time.perf_counter() - start)
                if j == 0:
                    first[label].append(times[label][-1])
    return times, first


def print_results(
    args: argparse.Namespace,
    batch_size: int,
    data: list[dict[str, torch.Tensor]],
    times: dict[str, list[float]],
    first: dict[str, list[float]],
) -> None:
    """The run's settings and the batches' tokens, then one row per variant and (``--compare``) the ratios."""
    labels = list(times)
    timed = data[args.warmup :]
    samples = sum(b["input_ids"].shape[0] for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(b["input_ids"].numel() for b in timed)
    print(
        f"model={args.model} device={args.device} precision={args.precision} "
        f"{'lora r=' + str(args.lora) if args.lora else 'full fine-tuning'} batch={batch_size} "
        f"steps={len(timed)} compile={args.compile} torch={torch.__version__} | "
        f"{tokens / samples:.0f} tokens/sample, padding {1 - tokens / padded:.1%}"
    )
    ref = sum(times[labels[0]])
    print(
        f"{'schedule':<22}{'s/step (median)':>16}{'samples/s':>11}{'tokens/s':>11}"
        f"{'x ' + labels[0]:>12}{'first on batch':>16}{'after another':>15}"
    )
    for label, ts in times.items():
        total = sum(ts)
        later = [t for t in ts if t not in first[label]]
        print(
            f"{label:<22}{_median(ts):>16.4f}{samples / total:>11.1f}{tokens / total:>11.0f}"
            f"{total / ref:>12.3f}{_median(first[label]):>16.4f}{_median(later):>15.4f}",
            flush=True,
        )
    if args.compare:
        for s in args.schedules:
            today, new = sum(times[f"{s} today"]), sum(times[f"{s} new"])
            print(
                f"compare {s}: today {samples / today:.1f} samples/s, new {samples / new:.1f} samples/s, "
                f"new/today {today / new:.2f}x",
                flush=True,
            )


def main() -> None:
    """Time every schedule (and path, ``--compare``) at each batch size and print the table."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trainer = build_trainer(args)
    # (label, schedule, path): each runs every batch
    if args.compare:
        variants = [(f"{s} {path}", s, path) for s in args.schedules for path in ("today", "new")]
    else:
        variants = [(s, s, "new") for s in args.schedules]
    for batch_size in args.batch:
        data = batches(args, batch_size, args.pad_to)
        old_data = batches(args, batch_size) if args.compare else data  # the same samples, padded as before
        times, first = time_steps(args, trainer, variants, data, old_data)
        print_results(args, batch_size, data, times, first)


def _today_loss(module: IAMRecModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss as `IAMRecModule.target_loss` computed it before the collator's target positions: the LM
    head on ``hidden[:, :-1][where]`` (boolean-mask indexing: the host reads the target count)."""
    hf = module.hf_model
    hidden = hf.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], segment_ids=batch["segment_ids"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    where = labels != IGNORE_INDEX
    return F.cross_entropy(hf.get_output_embeddings()(hidden[:, :-1][where]).float(), labels[where])


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


if __name__ == "__main__":
    main()
