"""coach_fx: end-cloud collaborative inference as a PyTorch compiler pass.

    >>> import coach_fx
    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(uplink_mbps=10),   # doctest: +SKIP
    ...                       end=coach_fx.Device("pi", slowdown=8))
    >>> cm(x); cm.plan; print(cm.report())                                             # doctest: +SKIP

or ``torch.compile(model, backend="coach", options={...same keywords...})``.

The names below are imported on first use, so that a run-time process importing
``coach_fx.runtime.wire`` does not load the optimizer, the accuracy oracle or networkx.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_EXPORTS = {
    "compile": "coach_fx.api", "serve": "coach_fx.deploy.service", "connect": "coach_fx.deploy.service", "CompiledModel": "coach_fx.compiled",
    "InputError": "coach_fx.compiled", "LayerDAG": "coach_fx.dag",
    "compile_online": "coach_fx.online", "OnlineModel": "coach_fx.online",
    "CaptureError": "coach_fx.passes.capture", "Plan": "coach_fx.plan",
    "evaluate": "coach_fx.plan", "Device": "coach_fx.settings", "Network": "coach_fx.settings",
    "Settings": "coach_fx.settings", "OnlineSettings": "coach_fx.online_settings",
    "RaySettings": "coach_fx.runtime.config", "StreamConfig": "coach_fx.runtime.config",
    "Trace": "coach_fx.runtime.traces", "train_cut": "coach_fx.cut_training", "CutTraining": "coach_fx.cut_training",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coach_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
