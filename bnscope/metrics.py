"""What a training framework calls its evaluation metrics, in the names of a run's ``evals``
table: one rule for every callback (:mod:`bnscope.lightning`, :mod:`bnscope.hf`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["evaluation_metrics"]

#: A validation metric that is the loss or the accuracy: an optional val/valid/validation/test
#: prefix (or eval, Hugging Face's Trainer's), then loss, acc or accuracy (Lightning's _epoch
#: fork too).
_KNOWN = re.compile(
    r"(?:(?:val|valid|validation|eval|test)[_/.\-]?)?(loss|acc|accuracy)(?:_epoch)?",
    re.IGNORECASE,
)


def evaluation_metrics(logged: Mapping[str, Any]) -> dict[str, float]:
    """Validation metrics as :meth:`bnscope.client.ClientRun.log_eval` names: the one loss
    (``val_loss``, ``val/loss``, ``valid_loss``, ``eval_loss``, ``loss``, ...) as ``test_loss``
    and the one accuracy (``val_acc``, ``eval_accuracy``, ...) as ``test_acc``, where exactly
    one metric is that and the caller did not log ``test_loss``/``test_acc`` itself; every
    other metric under its own name. Values that are not single numbers are left out, and so
    is Lightning's ``<name>_epoch`` copy of a metric logged on steps and epochs."""
    values: dict[str, float] = {}
    for name, v in logged.items():
        if name.endswith("_epoch") and name.removesuffix("_epoch") in logged:
            continue
        if isinstance(v, Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if isinstance(v, int | float) and not isinstance(v, bool):
            values[name] = float(v)
    renamed: dict[str, str] = {}
    for target, kinds in (("test_loss", ("loss",)), ("test_acc", ("acc", "accuracy"))):
        hits = [n for n in values if (m := _KNOWN.fullmatch(n)) and m[1].lower() in kinds]
        if len(hits) == 1 and target not in values:
            renamed[hits[0]] = target
    return {renamed.get(n, n): v for n, v in values.items()}
