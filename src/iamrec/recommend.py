"""Recommend with a trained model from Python: `Recommender`.

    from iamrec.recommend import Recommender

    rec = Recommender.from_checkpoint("runs/demo/checkpoints/last.ckpt")   # or .from_exported("export/")
    rec.recommend(["Toy Story (1995)", "Heat (1995)"], k=10)   # [Recommendation(item_id, title, score), ...]
    rec.recommend_batch([["Toy Story (1995)"], [0, 49]], k=5)  # titles or item ids, oldest first

Everything is the training code's: the prompt (`iamrec.data.PromptEncoder` with the checkpoint's data
settings: template, ``max_items``, ``max_length``; see `iamrec.data.histories` for the one length rule
without a known answer), the padding (`iamrec.data.Collator`), the title trie and the constrained beam
search (`iamrec.decoding`). `iamrec predict` (the `predict_step` of the LightningModule) decodes through
the same `search` and `top_recommendations` (`iamrec.decoding.ranking`).

Scores are HF beam scores: the sum of the title's token log-probabilities (EOS included) under the
model, ``length_penalty=0`` as in evaluation; higher is better. A title that several items share names the
smallest of their ids. Beam search keeps ``num_beams`` answers, and a repeated or off-catalogue answer is
dropped, so up to ``num_beams`` distinct items come back (``k`` must not exceed ``num_beams``).

``python -m iamrec.recommend CHECKPOINT`` prints one tested user's history, the top 10 and the true next
item (the end of `make demo`).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iamrec.attention import base_model
from iamrec.data import Collator, PromptEncoder, PromptTemplate, eval_subset_rows, load_items, load_samples
from iamrec.data.encoding import check_titles_sayable
from iamrec.data.fingerprint import CATALOGUE_KEY, check_catalogue
from iamrec.data.histories import Catalogue, UnknownItemError, encode_history, longest_answer
from iamrec.decoding import Recommendation, TitleTrie, search, top_recommendations
from iamrec.errors import guarded
from iamrec.lit_module import IAMRecModule
from iamrec.model.export import load_exported, read_settings
from iamrec.model.loading import load_tokenizer
from iamrec.run_checkpoints import load_checkpoint_header
from iamrec.run_folder import CheckpointError, last_checkpoint

__all__ = [
    "DATA_DEFAULTS",
    "RECORDED_DATA_KEYS",
    "Recommendation",
    "Recommender",
    "load_trained",
    "recorded_data",
    "search",
    "show_test_user",
    "top_recommendations",
]

# The data module's settings a trained model is used with: read from a checkpoint's recorded data
# hyper-parameters, and what `iamrec export` copies into the exported folder's settings (`recorded_data`).
RECORDED_DATA_KEYS = ("data_dir", "tokenizer", "template", "max_items", "max_length", "eval_batch_size")
# The data module's defaults, for checkpoints saved before it recorded its settings.
DATA_DEFAULTS: dict[str, Any] = {"max_items": 10, "max_length": 512, "template": None}


def recorded_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """The `RECORDED_DATA_KEYS` that `data` (a data module's recorded hyper-parameters) holds."""
    return {k: data[k] for k in RECORDED_DATA_KEYS if k in data}


def load_trained(path: str | Path, num_beams: int | None = None, seed: int = 0):
    """(IAMRecModule with the checkpoint's weights, the data module's recorded settings) of an `iamrec fit`
    checkpoint or of a run folder holding ``checkpoints/last.ckpt`` (see `Recommender.from_checkpoint`
    for `seed`). The settings hold ``catalogue`` too: the checkpoint's catalogue record
    (`iamrec.data.fingerprint`; None when it predates them)."""
    path = Path(path)
    if path.is_dir():
        path = last_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    header = load_checkpoint_header(path, resume=False)
    data = dict(header.get("datamodule_hyper_parameters") or {})
    data["catalogue"] = header.get(CATALOGUE_KEY)
    overrides = {"num_beams": num_beams} if num_beams is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = IAMRecModule.load_from_checkpoint(path, map_location="cpu", **overrides)
    return module.eval(), data


class Recommender:
    """Top-K next items for histories of titles or item ids, with a trained item-aware model.

    Args:
        model: The trained model (item-aware attention installed; peft-wrapped or merged).
        tokenizer: Its tokenizer.
        titles: Item titles by item id (the catalogue the model was trained on).
        template: The prompt template training used.
        max_items: Most recent history items a prompt keeps (training's ``data.max_items``).
        max_length: Training's ``data.max_length`` (see `iamrec.data.histories` for the rule).
        num_beams: Beams of the constrained search (the most recommendations one call can return).
        batch_size: Histories decoded together by `recommend_batch`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        titles: Sequence[str],
        template: PromptTemplate | None = None,
        max_items: int | None = 10,
        max_length: int = 512,
        num_beams: int = 20,
        batch_size: int = 8,
    ) -> None:
        if num_beams < 1 or batch_size < 1:
            raise ValueError(f"num_beams ({num_beams}) and batch_size ({batch_size}) must be >= 1.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.catalogue = Catalogue(titles)
        self.encoder = PromptEncoder(tokenizer, template or PromptTemplate(), titles, max_items, max_length)
        self.collate = Collator(tokenizer.pad_token_id, with_prompt=True)
        self.trie = TitleTrie.from_sequences(self.encoder.answer_ids, base_model(model).config.vocab_size)
        self.num_beams, self.batch_size = num_beams, batch_size
        self._longest = longest_answer(self.encoder)

    @property
    def titles(self) -> list[str]:
        return self.catalogue.titles

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- building ------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        data_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        num_beams: int | None = None,
        seed: int = 0,
        allow_other_catalogue: bool = False,
    ) -> Recommender:
        """The model of an `iamrec fit` checkpoint (its hyper-parameters rebuild it, then its weights load)
        with the catalogue and prompt settings of the data module it was trained with.

        Args:
            path: A ``last.ckpt`` (or a run folder holding ``checkpoints/last.ckpt``).
            data_dir: The processed dataset; default the ``data.data_dir`` the checkpoint records.
            device: Where the model runs.
            num_beams: Beams of the search (default the checkpoint's ``model.num_beams``).
            seed: Seeds the weights the checkpoint does not hold: only a LoRA checkpoint of the random
                ``tiny`` backbones (tests) lacks base weights; training drew them after
                ``seed_everything`` (0 in the shipped configs).
            allow_other_catalogue: Use a `data_dir` whose catalogue is not the one the checkpoint was
                trained on (refused by default: a `CatalogueMismatchError` names both folders, since the
                model's item ids would name other items; see `iamrec.data.fingerprint`).
        """
        module, data = load_trained(path, num_beams, seed)
        data_dir = data_dir or data.get("data_dir")
        if data_dir is None:
            raise CheckpointError(
                f"{path} records no data folder (it predates recorded data settings); pass data_dir= "
                "(the processed dataset it was trained on)."
            )
        said = check_catalogue(
            data.get("catalogue"), data_dir, path, allow_other_catalogue, "allow_other_catalogue=True"
        )
        if said:
            warnings.warn(said, stacklevel=2)
        model = module.model.to(device)
        tokenizer = load_tokenizer(data.get("tokenizer") or module.hparams.backbone)
        return cls._with_data(model, tokenizer, data_dir, data, module.hparams.num_beams)

    @classmethod
    def from_exported(
        cls,
        folder: str | Path,
        data_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        num_beams: int | None = None,
        allow_other_catalogue: bool = False,
    ) -> Recommender:
        """The model of an `iamrec export` folder (`iamrec.model.load_exported`: every file checked), with
        the data settings it records; `data_dir` defaults to the one it was trained on, and its catalogue
        must be the one the model was trained on unless `allow_other_catalogue` (see `from_checkpoint`)."""
        data = read_settings(folder).get("data", {})
        data_dir = data_dir or data.get("data_dir")
        if data_dir is None:
            raise ValueError(f"{folder} records no data folder; pass data_dir= (the processed dataset).")
        model, tokenizer, settings = load_exported(
            folder, data_dir=data_dir, allow_other_catalogue=allow_other_catalogue
        )
        beams = num_beams or settings.get("num_beams") or 20
        return cls._with_data(model.to(device), tokenizer, data_dir, data, beams)

    @classmethod
    def _with_data(cls, model, tokenizer, data_dir, data: dict[str, Any], num_beams: int) -> Recommender:
        settings = {**DATA_DEFAULTS, **{k: v for k, v in data.items() if k in DATA_DEFAULTS}}
        template = settings["template"]
        template = PromptTemplate(**template) if isinstance(template, dict) else template
        titles = load_items(data_dir)["title"].tolist()
        check_titles_sayable(tokenizer, titles, str(Path(data_dir) / "items.parquet"))
        return cls(
            model,
            tokenizer,
            titles,
            template,
            settings["max_items"],
            settings["max_length"],
            num_beams,
            batch_size=int(data.get("eval_batch_size") or 8),
        )

    # --- recommending --------------------------------------------------------------------------------
    def item_ids(self, history: Sequence[str | int]) -> list[int]:
        """The item ids of a history of titles and/or ids; `UnknownItemError` names an unknown title and
        the closest catalogue titles."""
        return list(self.catalogue.resolve(history))

    def recommend(
        self, history: Sequence[str | int], k: int = 10, exclude_history: bool = False
    ) -> list[Recommendation]:
        """The top `k` next items for one history (titles or item ids, oldest first). `exclude_history`
        drops items whose title the history holds (the list can then be shorter than `k`)."""
        return self.recommend_batch([history], k, exclude_history)[0]

    def recommend_batch(
        self, histories: Sequence[Sequence[str | int]], k: int = 10, exclude_history: bool = False
    ) -> list[list[Recommendation]]:
        """`recommend` for many histories, decoded `batch_size` at a time; one list per history."""
        if not 1 <= k <= self.num_beams:
            raise ValueError(f"k={k} must lie in 1..num_beams={self.num_beams} (raise num_beams for more).")
        resolved = []
        for i, history in enumerate(histories):
            try:
                resolved.append(self.catalogue.resolve(history))
            except UnknownItemError as err:
                where = f"history {i}: " if len(histories) > 1 else ""
                raise UnknownItemError(f"{where}{err}") from None
        out: list[list[Recommendation]] = []
        with torch.inference_mode():
            for start in range(0, len(resolved), self.batch_size):
                rows = [
                    encode_history(self.encoder, items, start + j, self._longest)
                    for j, items in enumerate(resolved[start : start + self.batch_size])
                ]
                batch = {k_: v.to(self.device) for k_, v in self.collate(rows).items()}
                result = search(self.model, batch, self.trie, self.num_beams)
                if not exclude_history:
                    out += top_recommendations(result, self.titles, k)
                    continue
                for items, recs in zip(
                    resolved[start : start + self.batch_size], top_recommendations(result, self.titles)
                ):
                    seen = {self.titles[i] for i in items}
                    out.append([r for r in recs if r.title not in seen][:k])
        return out


# ----------------------------------------------------------------------------------------- the demo


def show_test_user(
    checkpoint: str | Path, data_dir: str | Path | None = None, k: int = 10, index: int = 0
) -> str:
    """One tested user's history, the model's top `k` and the true next item, as printable text.

    The user is sample `index` of the test rows the checkpoint's run evaluates (``data.max_eval_samples``,
    ``data.seed``: the rows `iamrec test` scored).
    """
    checkpoint = Path(checkpoint)
    checkpoint = last_checkpoint(checkpoint) if checkpoint.is_dir() else checkpoint
    rec = Recommender.from_checkpoint(checkpoint, data_dir)
    data = dict(load_checkpoint_header(checkpoint, resume=False).get("datamodule_hyper_parameters") or {})
    data_dir = data_dir or data["data_dir"]
    samples = load_samples(data_dir, len(rec.titles))
    rows = eval_subset_rows(samples, "test", data.get("max_eval_samples"), int(data.get("seed") or 0))
    row = int(rows[index % len(rows)])
    history, target = samples.history(row), int(samples.target[row])
    recs = rec.recommend(history, k=k)
    rank = next((i for i, r in enumerate(recs) if rec.titles[r.item_id] == rec.titles[target]), None)
    lines = [f"Test user {int(samples.user_id[row])} (row {row} of samples.parquet), history oldest first:"]
    lines += [f"  {i + 1:>2}. {rec.titles[item]}" for i, item in enumerate(history)]
    found = f"ranked {rank + 1}" if rank is not None else f"not in the top {k}"
    lines.append(f"True next item: {rec.titles[target]} ({found}). The model's top {k}:")
    for i, r in enumerate(recs):
        mark = "   <- the true next item" if i == rank else ""
        lines.append(f"  {i + 1:>2}. [{r.item_id:>4}] {r.title}  (score {r.score:.3f}){mark}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m iamrec.recommend",
        description="Print one tested user's history, the model's top K and the true next item.",
    )
    parser.add_argument("checkpoint", help="last.ckpt of an iamrec fit, or its run folder")
    parser.add_argument("--data_dir", default=None, help="default: the data folder the checkpoint records")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", type=int, default=0, help="which of the tested samples")
    ns = parser.parse_args(args)
    print(guarded(lambda: show_test_user(ns.checkpoint, ns.data_dir, ns.k, ns.index)))


if __name__ == "__main__":
    main()
