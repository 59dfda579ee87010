"""`iamrec fit | validate | test | predict --config FILE [--key.path=value ...]` (LightningCLI).

The backbone is named once (`model.backbone`) and linked to the tokenizer of the data module. Errors
that people cause (a missing dataset, an impossible schedule, an offline hub id, an empty split) are
printed as one sentence, without a traceback (set IAMREC_DEBUG=1 to see it).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from iamrec.data import IAMDataModule
from iamrec.lit_module import IAMRecModule
from iamrec.run_folder import add_run_checkpoint, format_metrics_table

# Knobs that change only how a trained model is evaluated: with `--ckpt_path FILE` the command line (or
# config) wins over the checkpoint's saved hyper-parameters, which Lightning otherwise applies on top.
EVALUATION_KNOBS = ("num_beams", "ks", "val_generate")


class IAMRecCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """Lightning's checkpoint hyper-parameters, except the evaluation knobs; say what the checkpoint overrode."""
        sub = self.config.get("subcommand")
        if not sub:
            return super()._parse_ckpt_path()
        before = self.config[sub]["model"].clone()
        super()._parse_ckpt_path()
        model = self.config[sub]["model"]
        for key in EVALUATION_KNOBS:
            model[key] = before[key]
        for key, value in vars(model).items():
            if key in before and before[key] != value:
                print(
                    f"iamrec: model.{key} = {value!r} from the checkpoint (the config said {before[key]!r}); "
                    "the checkpoint's weights were trained with it.",
                    file=sys.stderr,
                )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.backbone", "data.tokenizer")
        add_run_checkpoint(parser, save_top_k=0)  # <root>/checkpoints/last.ckpt: `--ckpt_path last`

    def after_test(self) -> None:
        """Print the most-popular baseline on the same test samples beside the model."""
        from iamrec.baselines.popular import evaluate_popular

        dm = self.datamodule
        if not self.trainer.is_global_zero or not isinstance(dm, IAMDataModule):
            return
        ds = dm.datasets.get("test")
        indices = getattr(ds, "rows", None)  # the exact samples the model was tested on
        popular = evaluate_popular(dm.data_dir, split="test", ks=self.model.ks, sample_indices=indices)
        print(format_metrics_table({"most-popular": popular}, self.model.ks))


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        IAMRecCLI(
            IAMRecModule,
            IAMDataModule,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        if os.environ.get("IAMREC_DEBUG"):
            raise
        print(f"iamrec: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
