"""Any RecBole atomic dataset (``<name>.inter`` + ``<name>.item``) -> the processed contract (see
data_prep/common.py).

Usage::

    python -m data_prep.recbole --input raw/Amazon_Toys_and_Games --output data/processed/toys --k-core 5

``--input`` holds one ``.inter`` file and the ``.item`` file of the same name (or name them with
``--inter`` / ``--item``): tab-separated, a ``name:type`` header (type token, token_seq, float or
float_seq; a column without a type stops the run naming it), ``token_seq`` values space-separated. The
columns are RecBole's ``user_id``, ``item_id``, ``timestamp`` (seconds; ``--time-unit ms`` otherwise) and
the title ``title`` or ``movie_title`` (``--title-field`` for another; ``--user-field`` ... for datasets
that name theirs differently, e.g. Yelp's ``business_id``). The files are read by the one RecBole reader
(``data_prep.parsing.atomic_rows``, which ``data_prep.movielens`` also uses) and go through
``data_prep.interactions``: the same checks, counted drops (an item the ``.item`` file does not list is
dropped as ``not_in_items_file``), protocols and output. Titles are taken as written (spaces collapsed);
MovieLens' own title rules (the year put back, the "unkonwn" placeholder) are ``data_prep.movielens``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.common import print_summary, run_main
from data_prep.interactions import Columns, add_protocol_args, protocol_config
from data_prep.interactions import prepare as prepare_files
from data_prep.parsing import DataPrepError


def find_files(input_dir: Path | None, inter: Path | None, item: Path | None) -> tuple[Path, Path]:
    """The ``.inter`` file (the only one in ``input_dir`` unless named) and its ``.item`` file."""
    if inter is None:
        if input_dir is None or not input_dir.is_dir():
            raise DataPrepError("input directory not found (or give --inter and --item)", input_dir)
        found = sorted(input_dir.glob("*.inter"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise DataPrepError(
                f"expected one RecBole .inter file (found {names}); name it with --inter", input_dir
            )
        inter = found[0]
    return inter, item or inter.with_suffix(".item")


def prepare(
    input_dir: str | Path | None,
    output: str | Path,
    cfg=None,
    cols: Columns | None = None,
    time_unit: str = "s",
    inter: str | Path | None = None,
    item: str | Path | None = None,
) -> dict:
    """Parse one RecBole dataset and write the processed dataset; returns stats.json's content."""
    ipath, mpath = find_files(
        Path(input_dir) if input_dir else None, Path(inter) if inter else None, Path(item) if item else None
    )
    return prepare_files(ipath, mpath, output, cfg, cols, time_unit, fmt="recbole", name=ipath.stem)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.recbole",
        description="A RecBole atomic dataset (.inter + .item) -> items/users/interactions/samples parquet + "
        "stats.json (the processed contract of data_prep/common.py).",
    )
    p.add_argument("--input", type=Path, default=None, help="directory with <name>.inter and <name>.item")
    p.add_argument(
        "--inter", type=Path, default=None, help="the .inter file (overrides the search in --input)"
    )
    p.add_argument("--item", type=Path, default=None, help="the .item file (default: the .inter's name)")
    p.add_argument("--output", required=True, type=Path, help="output directory, e.g. data/processed/toys")
    p.add_argument("--user-field", default="user_id")
    p.add_argument("--item-field", default="item_id")
    p.add_argument("--time-field", default="timestamp")
    p.add_argument("--title-field", default=None, help="default: title, else movie_title")
    p.add_argument("--rating-field", default=None, help="a rating field, for --min-rating (e.g. rating)")
    p.add_argument("--time-unit", default="s", choices=["s", "ms"], help="unit of the times (default s)")
    add_protocol_args(p)
    a = p.parse_args(argv)
    if a.input is None and a.inter is None:
        p.error("give --input DIR, or --inter (and --item)")
    return a


def _run(a: argparse.Namespace) -> None:
    cols = Columns(a.user_field, a.item_field, a.time_field, a.title_field, a.rating_field)
    stats = prepare(a.input, a.output, protocol_config(a), cols, a.time_unit, a.inter, a.item)
    print_summary(stats, a.output)


def main(argv=None) -> int:
    return run_main(parse_args, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
