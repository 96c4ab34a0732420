"""The libraries a learning round imports on first use, and a way to import them ahead of time.

The round's heavy dependencies (scikit-learn, SciPy, cleanlab) are imported inside the functions that use them,
so a process that never trains (a web replica whose jobs run on RQ workers) never pays their ~75 MB. A process
whose threads do train would otherwise import them in the middle of its first fit; one large module's bytecode
(scipy.stats._continuous_distns) is read in a single call that holds the GIL for ~100 ms, which every other thread
of the process (a web server's /health included) waits out. Such a process imports them here, at start-up.
"""

from __future__ import annotations

import importlib

ROUND_MODULES: tuple[str, ...] = (
    "sklearn.metrics",  # model.assistant.stopping.stabilizing_predictions
    "scipy.stats",  # model.assistant.auto_accept.clopper_pearson_lower
    "scipy.optimize",  # model.assistant.stopping.fit_inverse_power_law
    "cleanlab.filter",  # model.assistant.label_errors.likely_label_errors
    "cleanlab.rank",
)
"""The single-label round's (the multi-label and segmentation layouts train with torch, which their index jobs
already load: preloading them would put torch's ~400 MB in every classification server)."""


def import_round_libraries() -> None:
    """Import every module of ``ROUND_MODULES`` (a no-op for those already imported)."""
    for name in ROUND_MODULES:
        importlib.import_module(name)
