"""Users per second of trie-constrained beam search: the fast path against HF generate, same run.

    python benchmarks/bench_decoding.py --model .assets/models/SmolLM2-135M-Instruct \\
        --users 8 --beams 20 --batch 4 --schedule iam

Prompts are real ML-100K test samples (10 history titles, ~136 SmolLM2 tokens) encoded by
`iamrec.data.PromptEncoder` — the same tokens and segment ids as training — and the trie holds every
catalogue answer from `iamrec.data.encode_answers` (title + EOS). Without `data/processed/ml100k`
(`make data-ml100k`) it falls back to synthetic titles and histories.

Both paths decode the same batches, alternating, and the script checks that they return identical beams
(tokens, order, items; scores within 1e-3, see SCORE_ATOL; the largest gap is printed). Prints users/s for each and the ratio; `--dense` also times
the fast path with HF's whole-vocabulary scoring (`sparse=False, head_chunk=None`) in the same run;
`--profile` adds a cProfile summary of the fast path. `--compare` also times the fast path with the trie's
edge list (``table=False``: the allowed tokens as many pairs as the beams' nodes have children, a count
read from the device each step; the lookup before the padded next-token table) on the same batches, checks
both give the same beams bit for bit and prints both users/s and the ratio. (Both run the same search
loop, one device read per step; for the loop as it was, run this script from an earlier commit.)

    python benchmarks/bench_decoding.py --device cuda --users 1024 --batch 256 --compare --skip-reference
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from iamrec.attention import PAD, apply_item_attention
from iamrec.data import PromptEncoder, PromptTemplate
from iamrec.decoding import (
    BeamResult,
    TitleTrie,
    constrained_beam_search,
    prefix_table,
    reference_beam_search,
)
from iamrec.model.loading import load_backbone, load_tokenizer


def load_catalogue(items: str, users: int, seed: int = 0) -> tuple[list[str], list[tuple[list[int], int]]]:
    """Titles and (history, target) pairs: real ML-100K test samples with 10 items, or synthetic ones."""
    path = Path(items)
    rng = random.Random(seed)
    if path.exists():
        import pandas as pd

        titles = pd.read_parquet(path).sort_values("item_id")["title"].tolist()
        samples_path = path.with_name("samples.parquet")
        if samples_path.exists():
            samples = pd.read_parquet(samples_path)
            test = samples[(samples["split"] == "test") & (samples["history"].map(len) >= 10)]
            rows = test.sample(n=users, random_state=seed)
            return titles, [(list(h), int(t)) for h, t in zip(rows["history"], rows["target"])]
    else:
        print(f"{items} not found: synthetic catalogue of 1,682 titles")
        words = [
            "Story",
            "Golden",
            "Eye",
            "Rooms",
            "Shorty",
            "Monkeys",
            "Babe",
            "Dead",
            "Walking",
            "Seven",
            "Suspects",
            "Twist",
            "Dawn",
            "Line",
        ]
        titles = [" ".join(rng.sample(words, rng.randint(1, 4))) + f" ({1930 + i % 70})" for i in range(1682)]
    return titles, [(rng.sample(range(len(titles)), 10), rng.randrange(len(titles))) for _ in range(users)]


def left_pad(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """(ids, segment ids) prompts -> left-padded ``(B, L)`` input_ids, attention_mask, segment_ids."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    seg = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, (tok, s) in enumerate(rows):
        ids[i, length - len(tok) :] = torch.tensor(tok)
        mask[i, length - len(tok) :] = 1
        seg[i, length - len(tok) :] = torch.tensor(s)
    return ids, mask, seg


# Scores are sums of up to 31 float32 log-probs. HF's log-softmax sums 49,152 exponentials in its own
# (vectorised, sequential) order, the sparse path in torch.sum's: about 7e-6 apart per step, ~1.5e-4 per
# answer on SmolLM2, always the same sign. Tokens, order and items must match exactly.
SCORE_ATOL = 1e-3


def same_beams(a, b, atol: float = SCORE_ATOL, a_rows: range | None = None) -> bool:
    """Whether `b`'s prompts got the same beams as rows `a_rows` of `a` (default: all rows, same order).

    Same answers (tokens), order and items, and scores within `atol`.
    """
    a_rows = a_rows or range(a.scores.shape[0])
    k = a.scores.shape[1]
    for j, i in enumerate(a_rows):
        if [a.answer(i, m) for m in range(k)] != [b.answer(j, m) for m in range(k)] or a.items[i] != b.items[
            j
        ]:
            return False
    rows = torch.tensor(list(a_rows), device=a.scores.device)
    return bool(torch.allclose(a.scores[rows], b.scores, atol=atol, rtol=0))


def score_gap(a, b, a_rows: range | None = None) -> float:
    """Largest score difference between `b` and rows `a_rows` of `a`, over the non-placeholder slots."""
    rows = torch.tensor(list(a_rows or range(a.scores.shape[0])), device=a.scores.device)
    real = (a.scores[rows] > -1e8) & (b.scores > -1e8)
    return float((a.scores[rows] - b.scores).abs()[real].max()) if bool(real.any()) else 0.0


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=".assets/models/SmolLM2-135M-Instruct")
    parser.add_argument("--items", default="data/processed/ml100k/items.parquet")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--schedule", default="iam")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-reference", action="store_true", help="time the fast path only")
    parser.add_argument(
        "--reference-users",
        type=int,
        default=None,
        help="compare with HF generate on the batches holding the first N users only (default: every user)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed decodes of the first batch first (CUDA: kernels, allocator)",
    )
    parser.add_argument(
        "--per-beam",
        action="store_true",
        help="also time the fast path with the prompt cache copied per beam",
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help="also time the fast path scoring the whole vocabulary in one LM-head product (sparse=False, head_chunk=None)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the fast path on one batch")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also time the edge-list trie lookup (table=False) on the same batches; print both and the ratio",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument(
        "--reference-batch",
        type=int,
        default=None,
        help="users per HF generate call (default: --batch); the fast path may batch more users per call",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from --model's config.json with random weights (timing only; beams still compared)",
    )
    return parser.parse_args()


# left-padded (B, L) input_ids, attention_mask, segment_ids
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Bench:
    """What every path decodes: the model, the trie of every answer and the users' prompts in batches."""

    model: torch.nn.Module
    pad_id: int
    titles: list[str]
    samples: list[tuple[list[int], int]]  # (history, target) per user
    trie: TitleTrie
    table: dict[tuple[int, ...], list[int]]  # the trie as HF's prefix_allowed_tokens_fn reads it
    build_s: float  # seconds to build the trie and the table
    prompts: list[tuple[list[int], list[int]]]  # (ids, segment ids) per user
    batches: list[Batch]


def build_bench(args: argparse.Namespace) -> Bench:
    """Load the model with ``--schedule``, the catalogue and its trie, and encode the users' prompts."""
    tokenizer = load_tokenizer(args.model)
    backbone = load_backbone(args.model, dtype=args.dtype, random_weights=args.random_weights)
    model = apply_item_attention(backbone.to(args.device).eval(), args.schedule)
    titles, samples = load_catalogue(args.items, args.users)
    encoder = PromptEncoder(tokenizer, PromptTemplate(), titles, max_items=10)
    vocab = model.get_output_embeddings().weight.shape[0]
    t = time.perf_counter()
    trie = TitleTrie.from_sequences(encoder.answer_ids, vocab)
    table = prefix_table(trie)
    build = time.perf_counter() - t
    encoded = [encoder.encode(h, target) for h, target in samples]
    prompts = [(e.input_ids[: e.prompt_length], e.segment_ids[: e.prompt_length]) for e in encoded]
    batches = [
        tuple(t.to(args.device) for t in left_pad(prompts[i : i + args.batch], tokenizer.pad_token_id))
        for i in range(0, len(prompts), args.batch)
    ]
    return Bench(model, tokenizer.pad_token_id, titles, samples, trie, table, build, prompts, batches)


def print_setup(args: argparse.Namespace, bench: Bench) -> None:
    """One line: the model, the catalogue and trie, the prompts and the batch sizes."""
    trie, prompts = bench.trie, bench.prompts
    print(
        f"model {args.model} ({args.dtype}{', random weights' if args.random_weights else ''}, "
        f"schedule {args.schedule}, {args.device}), {args.threads} threads | "
        f"{len(bench.titles)} items, trie {trie.num_nodes} nodes, longest answer {trie.max_depth} tokens "
        f"(built in {bench.build_s:.2f}s) | {len(prompts)} users, prompts "
        f"{min(len(p) for p, _ in prompts)}-{max(len(p) for p, _ in prompts)} tokens, "
        f"{args.beams} beams, batch {args.batch} (reference batch {args.reference_batch or args.batch})"
    )


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so that a clock read after it times the work itself."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Totals:
    """What the batches add up to, for the summary."""

    fast_s: float = 0.0
    ref_s: float = 0.0
    per_beam_s: float = 0.0
    dense_s: float = 0.0
    edges_s: float = 0.0
    edges_same: bool = True  # --compare: the edge lookup gave bit-identical beams on every batch
    identical: bool = True  # the reference gave the same beams on every compared batch
    steps: list[int] = field(default_factory=list)  # search steps per batch
    hits: int = 0  # users whose target is among their beams' items
    filler: int = 0  # HF's placeholder beams (score ~ -1e9)
    gap: float = 0.0  # largest score gap to the reference
    compared: int = 0  # users the reference decoded
    fast_times: list[float] = field(default_factory=list)  # fast path seconds per batch


def time_fast(
    args: argparse.Namespace, bench: Bench, totals: Totals, i: int, batch: Batch
) -> tuple[BeamResult, str]:
    """Decode batch ``i`` with the fast path; its beams and the start of the batch's line."""
    t = time.perf_counter()
    fast = constrained_beam_search(bench.model, *batch, bench.trie, args.beams)
    sync(args.device)
    totals.fast_times.append(time.perf_counter() - t)
    totals.fast_s += totals.fast_times[-1]
    totals.steps.append(fast.steps)
    totals.filler += int((fast.scores < -1e8).sum())
    targets = [target for _, target in bench.samples[i * args.batch : (i + 1) * args.batch]]
    totals.hits += sum(target in sum(items, []) for target, items in zip(targets, fast.items))
    return fast, f"batch {i}: fast {time.perf_counter() - t:6.1f}s ({fast.steps} steps)"


def time_variants(
    args: argparse.Namespace, bench: Bench, totals: Totals, batch: Batch, fast: BeamResult
) -> str:
    """Decode the batch with the fast path's variants asked for (edge lookup, per-beam cache, dense
    scoring), each checked against ``fast``; their part of the batch's line."""
    model, trie, line = bench.model, bench.trie, ""
    if args.compare:
        t = time.perf_counter()
        edges = constrained_beam_search(model, *batch, trie, args.beams, table=False)
        sync(args.device)
        totals.edges_s += time.perf_counter() - t
        same = torch.equal(edges.sequences, fast.sequences) and torch.equal(edges.scores, fast.scores)
        totals.edges_same &= same and edges.items == fast.items
        line += f" | edge lookup {time.perf_counter() - t:6.1f}s, bit-identical: {same}"
    if args.per_beam:
        t = time.perf_counter()
        per_beam = constrained_beam_search(model, *batch, trie, args.beams, shared_prompt=False)
        totals.per_beam_s += time.perf_counter() - t
        line += f" | per-beam cache {time.perf_counter() - t:6.1f}s, same beams: {same_beams(fast, per_beam)}"
    if args.dense:
        t = time.perf_counter()
        dense = constrained_beam_search(model, *batch, trie, args.beams, sparse=False, head_chunk=None)
        totals.dense_s += time.perf_counter() - t
        line += f" | dense scoring {time.perf_counter() - t:6.1f}s, same beams: {same_beams(fast, dense)}"
    return line


def time_reference(args: argparse.Namespace, bench: Bench, totals: Totals, i: int, fast: BeamResult) -> str:
    """Decode batch ``i``'s users with HF generate, ``--reference-batch`` per call, checked against
    ``fast``; its part of the batch's line."""
    rb = args.reference_batch or args.batch
    users = bench.prompts[i * args.batch : (i + 1) * args.batch]
    t, same = time.perf_counter(), True
    for j in range(0, len(users), rb):  # the same users, `rb` per HF generate call
        r_ids, r_mask, r_seg = (x.to(args.device) for x in left_pad(users[j : j + rb], bench.pad_id))
        ref = reference_beam_search(
            bench.model, r_ids, r_mask, r_seg, bench.trie, args.beams, table=bench.table
        )
        same &= same_beams(fast, ref, a_rows=range(j, min(j + rb, len(users))))
        totals.gap = max(totals.gap, score_gap(fast, ref, a_rows=range(j, min(j + rb, len(users)))))
    totals.ref_s += time.perf_counter() - t
    totals.identical &= same
    totals.compared += len(users)
    return f" | reference {time.perf_counter() - t:6.1f}s | identical beams: {same}"


def run_batches(args: argparse.Namespace, bench: Bench) -> Totals:
    """Every path on every batch, in turn; prints one line per batch."""
    for _ in range(args.warmup):
        constrained_beam_search(bench.model, *bench.batches[0], bench.trie, args.beams)
    sync(args.device)
    totals = Totals()
    for i, batch in enumerate(bench.batches):
        fast, line = time_fast(args, bench, totals, i, batch)
        line += time_variants(args, bench, totals, batch, fast)
        if not args.skip_reference and (
            args.reference_users is None or i * args.batch < args.reference_users
        ):
            line += time_reference(args, bench, totals, i, fast)
        print(line, flush=True)
    return totals


def print_summary(args: argparse.Namespace, n: int, totals: Totals) -> None:
    """Users/s of each path over the ``n`` users, the ratios, and what the beams found."""
    fast_s, compared = totals.fast_s, totals.compared
    print(
        f"fast path:  {n / fast_s:.3f} users/s  ({fast_s:.1f}s for {n} users, steps per batch {totals.steps})"
    )
    if args.compare:
        print(
            f"compare: edge lookup (table=False) {n / totals.edges_s:.3f} users/s, table (new) {n / fast_s:.3f} "
            f"users/s, new/edges {totals.edges_s / fast_s:.2f}x, bit-identical beams on every batch: "
            f"{totals.edges_same}"
        )
    if args.per_beam:
        print(
            f"per-beam:   {n / totals.per_beam_s:.3f} users/s  ({totals.per_beam_s:.1f}s)  "
            "[prompt cache copied to every beam]"
        )
    if args.dense:
        print(
            f"dense:      {n / totals.dense_s:.3f} users/s  ({totals.dense_s:.1f}s)  [whole-vocabulary scoring, "
            f"one LM-head product]  -> fast is {totals.dense_s / fast_s:.2f}x"
        )
    if compared:
        fast_compared = sum(totals.fast_times[: -(-compared // args.batch)])
        print(
            f"reference:  {compared / totals.ref_s:.3f} users/s  ({totals.ref_s:.1f}s for {compared} users)  "
            "[HF generate + prefix_allowed_tokens_fn]"
        )
        print(
            f"speed-up:   {totals.ref_s / fast_compared:.2f}x (on the {compared} users both decoded)   identical "
            f"beams on every compared batch: {totals.identical} (largest score gap {totals.gap:.1e})"
        )
    print(f"HR@{args.beams} of these users: {totals.hits}/{n}")
    print(
        f"placeholder slots (HF's filler beams, score ~ -1e9, when fewer than {args.beams} answers finish): "
        f"{totals.filler} of {n * args.beams}"
    )


def profile(args: argparse.Namespace, bench: Bench) -> None:
    """cProfile the fast path on the first batch; prints the 15 costliest functions."""
    import cProfile
    import pstats

    model, trie = bench.model, bench.trie
    ids, mask, seg = bench.batches[0]
    cProfile.runctx(
        "constrained_beam_search(model, ids, mask, seg, trie, args.beams)",
        globals(),
        locals(),
        "/tmp/bench_dec",
    )
    pstats.Stats("/tmp/bench_dec").sort_stats("tottime").print_stats(15)


def main() -> None:
    """Time the fast path (and the paths asked for) on the same batches and print the figures."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench = build_bench(args)
    print_setup(args, bench)
    totals = run_batches(args, bench)
    print_summary(args, len(bench.prompts), totals)
    if args.profile:
        profile(args, bench)


if __name__ == "__main__":
    main()
