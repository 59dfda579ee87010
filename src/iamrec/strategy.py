"""``trainer.strategy: fsdp`` as iamrec runs it: FSDP with one unit per decoder layer.

Lightning's plain ``fsdp`` wraps nothing but the root unless given an ``auto_wrap_policy``, so the whole
model's weights would be gathered at once. `fsdp_strategy` gives Lightning's `FSDPStrategy` the backbone's
decoder-layer class as its policy (a set of module classes, `iamrec.model.decoder_layer_classes`): each
decoder layer is its own FSDP unit, the embeddings, final norm and LM head (tied or not) share the root
unit. The model is built in `IAMRecModule.configure_model` and wrapped after it; with
``trainer.precision: bf16-mixed`` Lightning's FSDP keeps the sharded fp32 parameters as AdamW's master
weights and gathers, computes and reduces in bf16. Checkpoints are full state dicts (one file, saved by
rank 0, written atomically like every checkpoint), so ``--ckpt_path last`` and ``iamrec test`` read them
on any number of devices.

`iamrec.cli` swaps the string ``fsdp`` for this strategy; a strategy given as a class (``class_path:
lightning.pytorch.strategies.FSDPStrategy`` with ``init_args``) is used as given.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from iamrec.model import decoder_layer_classes


def fsdp_strategy(backbone: str, **kwargs: Any) -> FSDPStrategy:
    """Lightning's `FSDPStrategy` sharding `backbone` (a model spec) per decoder layer; `kwargs` go to it."""
    kwargs.setdefault("auto_wrap_policy", set(decoder_layer_classes(backbone)))
    kwargs.setdefault("state_dict_type", "full")
    return FSDPStrategy(**kwargs)
