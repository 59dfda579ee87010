"""Non-LLM baselines behind iamrec's data contract and metrics: most-popular and SASRec.

Names are resolved lazily, so ``python -m iamrec.baselines.popular`` runs without importing Lightning
(and without Python's double-import warning for a module run as ``__main__``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "evaluate_popular": "iamrec.baselines.popular",
    "SASRec": "iamrec.baselines.sasrec_model",
    "SASRecDataModule": "iamrec.baselines.sasrec_data",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'iamrec.baselines' has no attribute {name!r}")
