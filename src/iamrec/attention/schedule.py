"""Layer schedules: which attention kind(s) each decoder layer runs.

A schedule is a list with one entry per decoder layer. An entry is one kind (``"intra"``) or several
joined by ``+`` (``"intra+inter"``): stacked passes inside that layer, each with its own residual and
reusing the layer's attention weights. Presets, for N layers:

    causal               causal x N                      standard-attention baseline (BIGRec-style)
    iam                  intra, inter, intra, inter ...  IAM (reading: alternate, intra first)
    iam_inter_first      inter, intra, ...               ordering ablation
    split                intra x s, inter x (N - s)      ordering ablation, block form (s = split_at, N//2)
    split_inter_first    inter x s, intra x (N - s)
    stacked              intra+inter x N                 ordering ablation, in-layer form
    stacked_inter_first  inter+intra x N
    intra_only           intra x N                       component ablation
    inter_only           inter x N                       component ablation
    hatllm               intra x a, causal, inter x b    HatLLM baseline (bands a, b; default N//3 each)

A second reading of IAM keeps every pretrained layer causal and *adds* item-aware sublayers with their own
weights (``ItemAttentionConfig.added``, one entry per decoder layer: the added kinds after that layer, in
order, joined by ``+``; ``""`` for none). Presets that choose them (every host layer ``causal``):

    added_iam            causal > intra > inter, x N     IAM as added layers: intra then inter after every layer
    added_inter_first    causal > inter > intra, x N     ordering ablation
    added_top            causal x s, causal > intra > inter x (N - s)   only the upper layers (s = split_at, N//2)
    added_alternate      causal > intra, causal > inter, ...           one added layer per depth, alternating
    added_causal         causal > causal > causal, x N   control: the same added parameters, no item awareness
"""

from __future__ import annotations

from collections.abc import Sequence

from iamrec.attention.masks import KINDS

PRESETS: tuple[str, ...] = (
    "causal",
    "iam",
    "iam_inter_first",
    "split",
    "split_inter_first",
    "stacked",
    "stacked_inter_first",
    "intra_only",
    "inter_only",
    "hatllm",
    "added_iam",
    "added_inter_first",
    "added_top",
    "added_alternate",
    "added_causal",
)
ADDED_PRESETS: tuple[str, ...] = tuple(name for name in PRESETS if name.startswith("added_"))

Schedule = list[tuple[str, ...]]


class ScheduleError(ValueError):
    """A schedule that does not fit the backbone; the message names the config key."""


def _alternate(first: str, second: str, n: int) -> list[str]:
    return [first if i % 2 == 0 else second for i in range(n)]


def preset_entries(
    name: str,
    num_layers: int,
    split_at: int | None = None,
    hatllm_bands: Sequence[int] | None = None,
    key: str = "schedule",
) -> list[str]:
    """The per-layer entries of preset `name` for a backbone with `num_layers` decoder layers."""
    n = num_layers
    if name == "causal" or name in ADDED_PRESETS:  # the added presets keep every pretrained layer causal
        return ["causal"] * n
    if name in ("iam", "iam_inter_first"):
        return _alternate("intra", "inter", n) if name == "iam" else _alternate("inter", "intra", n)
    if name in ("split", "split_inter_first"):
        s = n // 2 if split_at is None else split_at
        if not 0 < s < n:
            raise ScheduleError(
                f"split_at={s} must lie strictly between 0 and the {n} decoder layers ({key}='{name}')."
            )
        a, b = ("intra", "inter") if name == "split" else ("inter", "intra")
        return [a] * s + [b] * (n - s)
    if name in ("stacked", "stacked_inter_first"):
        return ["intra+inter" if name == "stacked" else "inter+intra"] * n
    if name in ("intra_only", "inter_only"):
        return [name.removesuffix("_only")] * n
    if name == "hatllm":
        a, b = (n // 3, n // 3) if hatllm_bands is None else tuple(hatllm_bands)
        if a < 0 or b < 0 or a + b > n:
            raise ScheduleError(
                f"hatllm_bands=({a}, {b}) does not fit {n} decoder layers: the intra and inter bands must be >= 0 "
                f"and add up to at most {n} ({key}='hatllm')."
            )
        return ["intra"] * a + ["causal"] * (n - a - b) + ["inter"] * b
    raise unknown_preset(name, key)


def added_preset_entries(
    name: str, num_layers: int, split_at: int | None = None, key: str = "schedule"
) -> list[str]:
    """The per-layer added sublayers of preset `name` (``""``: none; every preset but the added ones: none)."""
    n = num_layers
    if name == "added_iam":
        return ["intra+inter"] * n
    if name == "added_inter_first":
        return ["inter+intra"] * n
    if name == "added_top":
        s = n // 2 if split_at is None else split_at
        if not 0 <= s < n:
            raise ScheduleError(
                f"split_at={s} must lie in [0, {n}) so that at least one of the {n} decoder layers gets the "
                f"added sublayers ({key}='{name}')."
            )
        return [""] * s + ["intra+inter"] * (n - s)
    if name == "added_alternate":
        return _alternate("intra", "inter", n)
    if name == "added_causal":
        return ["causal+causal"] * n
    return [""] * n


def resolve_added(added: Sequence[str], num_layers: int, key: str = "added") -> list[tuple[str, ...]]:
    """Turn one added-sublayer entry per decoder layer into tuples of kinds (``()``: none), validated.

    >>> resolve_added(["intra+inter", "", "none", "inter"], 4)
    [('intra', 'inter'), (), (), ('inter',)]
    """
    entries = list(added)
    if len(entries) != num_layers:
        raise ScheduleError(
            f"{key} lists {len(entries)} layers but the backbone has {num_layers} decoder layers; give one "
            "entry per layer ('' for none) or use an added preset as the schedule "
            f"({', '.join(ADDED_PRESETS)})."
        )
    resolved = []
    for i, entry in enumerate(entries):
        text = "" if entry is None else str(entry).strip()
        if text in ("", "none"):
            resolved.append(())
            continue
        kinds = tuple(part.strip() for part in text.split("+"))
        bad = [kind for kind in kinds if kind not in KINDS]
        if bad:
            raise ScheduleError(
                f"{key}[{i}]='{entry}' is not a kind; use {', '.join(KINDS)}, several joined by '+', "
                "or '' for none."
            )
        resolved.append(kinds)
    return resolved


def unknown_preset(name: str, key: str = "schedule") -> ScheduleError:
    """The error for a schedule name that is not a preset."""
    return ScheduleError(
        f"{key}='{name}' is not a preset; choose one of {', '.join(PRESETS)} or give a list of kinds."
    )


def resolve_schedule(
    schedule: str | Sequence[str],
    num_layers: int,
    split_at: int | None = None,
    hatllm_bands: Sequence[int] | None = None,
    key: str = "schedule",
) -> Schedule:
    """Turn a preset name or an explicit list into one tuple of kinds per decoder layer, validated.

    >>> resolve_schedule("iam", 4)
    [('intra',), ('inter',), ('intra',), ('inter',)]
    >>> resolve_schedule(["causal", "intra+inter"], 2)
    [('causal',), ('intra', 'inter')]
    """
    if isinstance(schedule, str):
        entries = preset_entries(schedule, num_layers, split_at, hatllm_bands, key)
    else:
        entries = list(schedule)
        if len(entries) != num_layers:
            raise ScheduleError(
                f"{key} lists {len(entries)} layers but the backbone has {num_layers} decoder layers; "
                f"give one entry per layer or use a preset ({', '.join(PRESETS)})."
            )
    resolved: Schedule = []
    for i, entry in enumerate(entries):
        kinds = tuple(part.strip() for part in str(entry).split("+"))
        bad = [kind for kind in kinds if kind not in KINDS]
        if bad or not kinds:
            raise ScheduleError(
                f"{key}[{i}]='{entry}' is not a kind; use {', '.join(KINDS)} or several joined by '+'."
            )
        resolved.append(kinds)
    return resolved


def describe(schedule: Schedule, added: Sequence[Sequence[str]] | None = None) -> str:
    """A compact one-line summary, e.g. ``intra,inter,intra,inter``; added sublayers follow ``>``.

    >>> describe([("causal",), ("causal",)], [("intra", "inter"), ()])
    'causal>intra>inter,causal'
    """
    added = added or [()] * len(schedule)
    return ",".join(
        "+".join(kinds) + "".join(f">{kind}" for kind in extra) for kinds, extra in zip(schedule, added)
    )
