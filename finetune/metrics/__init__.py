"""Metric loading: the Hub module by name first, the project's own local module when the Hub is unreachable.

The `evaluate` wheel ships no metric scripts, so `evaluate.load("accuracy")` needs the Hub. Each name in
`LOCAL_METRICS` has a local module here (`<name>/<name>.py`) with the Hub module's inputs, kwargs and
output keys, computed with scikit-learn, sacrebleu, rouge_score, seqeval or the official SQuAD scripts' logic.

Cost offline: when neither `HF_HUB_OFFLINE` nor `HF_EVALUATE_OFFLINE` is set, a Hub attempt that fails
takes about 1.5 s (evaluate 0.4.6 then raises `FileNotFoundError`) before the local fallback; after one
failure the process uses the local modules without asking again. With either variable set, a local metric
loads directly. Which modules are used is said once per process, at INFO. Loaded modules are cached per name for the
process, so that cost is paid once per name. `evaluate` itself is imported on the first load (~4 s).

evaluate copies a local module to `$HF_MODULES_CACHE/evaluate_modules/metrics/<name>/<sha256>/` and
imports it from there, so local modules are always loaded by absolute path (a bare relative path is
looked up in the current directory first).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

__all__ = ["LOCAL_METRICS", "load_metric", "metric_source"]

logger = logging.getLogger(__name__)

LOCAL_METRICS: tuple[str, ...] = (
    "accuracy",
    "chrf",
    "f1",
    "precision",
    "recall",
    "rouge",
    "sacrebleu",
    "seqeval",
    "squad",
    "squad_v2",
)

_METRICS_DIR = Path(__file__).resolve().parent
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
_TRUTHY = frozenset({"1", "true", "yes", "on"})

# name -> (loaded module, source: "hub" or the local script's absolute path)
_LOADED: dict[str, tuple[evaluate.EvaluationModule, str]] = {}
# Offline is the normal state: say once per process, plainly, which modules are used (details at DEBUG).
OFFLINE_NOTICE = "metrics: finetune's local metric modules (offline)"
HUB_UNREACHABLE_NOTICE = ("metrics: the Hugging Face Hub is not reachable, so finetune's local metric modules are "
                          "used (HF_HUB_OFFLINE=1 skips the attempt)")
_SAID_LOCAL = False
_HUB_UNREACHABLE = False
"""Set after the first failed Hub attempt: later names go straight to the local modules (each attempt ~1.5 s)."""


def _offline() -> bool:
    # Read at call time (evaluate reads HF_EVALUATE_OFFLINE only at import) so a later setenv counts.
    return any(os.environ.get(var, "").strip().lower() in _TRUTHY for var in _OFFLINE_VARS)


def _local_script(name: str) -> str:
    return str(_METRICS_DIR / name / f"{name}.py")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load metric `name`: from the Hub, or from the local module when offline or the Hub fails.

    Raises ValueError when the Hub cannot provide `name` and there is no local module for it.
    """
    # Imported here: `import evaluate` takes ~4 s, which importing this package should not cost.
    import evaluate

    global _HUB_UNREACHABLE
    if name in _LOADED:
        return _LOADED[name][0]
    if _offline() or _HUB_UNREACHABLE:
        if name not in LOCAL_METRICS:
            why = "offline" if _offline() else "the Hub is not reachable"
            raise ValueError(f"metric {name!r} has no local module and {why}; local metrics: "
                             f"{', '.join(LOCAL_METRICS)}")
        module, source = _load_local(name, OFFLINE_NOTICE if _offline() else HUB_UNREACHABLE_NOTICE)
    else:
        try:
            module = evaluate.load(name)
            source = "hub"
            logger.info("metric %s: Hub module", name)
        # FileNotFoundError (what evaluate 0.4.6 raises offline) and ConnectionError (builtin and
        # requests') are OSErrors; ValueError covers malformed or refused Hub answers.
        except (OSError, ValueError) as err:
            if name not in LOCAL_METRICS:
                raise ValueError(
                    f"metric {name!r} could not be loaded from the Hub ({err}) and has no local module; "
                    f"local metrics: {', '.join(LOCAL_METRICS)}"
                ) from err
            _HUB_UNREACHABLE = True
            logger.debug("metric %s: Hub attempt failed: %s", name, err)
            module, source = _load_local(name, HUB_UNREACHABLE_NOTICE)
    _LOADED[name] = (module, source)
    return module


def _load_local(name: str, notice: str) -> tuple[evaluate.EvaluationModule, str]:
    """The local module of ``name``; ``notice`` is said at INFO the first time in this process."""
    import evaluate

    global _SAID_LOCAL
    source = _local_script(name)
    module = evaluate.load(source)
    if not _SAID_LOCAL:
        logger.info(notice)
        _SAID_LOCAL = True
    logger.debug("metric %s: local module %s", name, source)
    return module, source


def metric_source(name: str) -> str:
    """Return where `name` was loaded from in this process: "hub" or the local script's absolute path."""
    try:
        return _LOADED[name][1]
    except KeyError:
        raise KeyError(f"metric {name!r} has not been loaded in this process") from None
