"""Training-step time of item-aware schedules against the stock causal model, same run, same weights.

    python benchmarks/bench_attention.py --model .assets/models/SmolLM2-135M-Instruct --batch 4 --length 256

Prints seconds per LoRA training step (forward + backward + AdamW), the ratio to `causal` and the trainable
parameters. Any schedule preset can be measured, the added-layer ones (``added_iam``, ``added_top``, ...)
included: their sublayers get LoRA adapters like the layers' own attention. ``--rounds R`` measures every
schedule R times in turn and reports the fastest round (a shared machine slows some rounds, never speeds one up).
On a GPU add `--backends sdpa flex --device cuda`.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from iamrec.attention import apply_item_attention
from iamrec.model import LoraConfig, add_lora
from iamrec.model.loading import load_backbone
from iamrec.segments import CONTEXT, TARGET


def synthetic_batch(batch: int, length: int, vocab: int, item_len: int = 12, device: str = "cpu"):
    """Prompts shaped like ML-100K ones: 20 context tokens, items of `item_len` tokens, 6 header, 10 target."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 1, (batch, length), generator=gen)
    seg = torch.full((batch, length), CONTEXT)
    pos, k = 20, 1
    while pos + item_len < length - 16:
        seg[:, pos : pos + item_len] = k
        pos, k = pos + item_len, k + 1
    seg[:, length - 10 :] = TARGET
    mask = torch.ones(batch, length, dtype=torch.long)
    return ids.to(device), mask.to(device), seg.to(device)


def step_time(model, ids, mask, seg, steps: int, warmup: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    labels = ids.masked_fill(seg != TARGET, -100)
    times = []
    for i in range(warmup + steps):
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, segment_ids=seg, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=".assets/models/SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=["causal", "iam", "stacked", "hatllm", "added_iam", "added_top", "added_alternate"],
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every schedule this many times in turn"
    )
    parser.add_argument("--backends", nargs="+", default=["sdpa"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype", default="float32", help="base weights: float32 | bfloat16 (LoRA stays fp32)"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from --model's config.json with random weights (same shapes, same cost)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lora = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    base = load_backbone(args.model, dtype=args.dtype, random_weights=args.random_weights)
    ids, mask, seg = synthetic_batch(args.batch, args.length, base.config.vocab_size, device=args.device)
    print(
        f"model={args.model}{' (random weights)' if args.random_weights else ''} dtype={args.dtype} "
        f"device={args.device} batch={args.batch} length={args.length} "
        f"layers={base.config.num_hidden_layers} torch={torch.__version__}"
    )
    rounds: dict[tuple[str, str], list[float]] = {}
    trainable: dict[tuple[str, str], int] = {}
    for _ in range(args.rounds):
        for backend in args.backends:
            for schedule in args.schedules:
                model = copy.deepcopy(base).to(args.device).train()
                model = add_lora(model, lora)
                apply_item_attention(model, schedule, backend=backend)
                key = (backend, schedule)
                trainable[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                t = step_time(model, ids, mask, seg, args.steps, args.warmup)
                rounds.setdefault(key, []).append(t)
                del model
    results = {key: min(ts) for key, ts in rounds.items()}
    ref = results.get((args.backends[0], "causal"))
    print(f"{'backend':<8}{'schedule':<17}{'s/step':>9}{'x causal':>10}{'trainable':>12}")
    for (backend, schedule), t in results.items():
        ratio = f"{t / ref:.2f}" if ref else "-"
        params = f"{trainable[(backend, schedule)] / 1e6:.2f}M"
        print(f"{backend:<8}{schedule:<17}{t:>9.3f}{ratio:>10}{params:>12}")


if __name__ == "__main__":
    main()
