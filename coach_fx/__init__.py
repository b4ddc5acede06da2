"""coach_fx: end-cloud collaborative inference as a PyTorch compiler pass.

    >>> import coach_fx
    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(uplink_mbps=10),   # doctest: +SKIP
    ...                       end=coach_fx.Device("pi", slowdown=8))
    >>> cm(x); cm.plan; print(cm.report())                                             # doctest: +SKIP

or ``torch.compile(model, backend="coach", options={...same keywords...})``.
"""

from coach_fx.compiled import CompiledModel, InputError, compile
from coach_fx.graph import LayerDAG
from coach_fx.online import OnlineModel, compile_online
from coach_fx.passes.capture import CaptureError
from coach_fx.plan import Plan, evaluate
from coach_fx.settings import Device, Network, Settings
from coach_fx.traces import Trace

__all__ = ["compile", "CompiledModel", "Plan", "evaluate", "LayerDAG", "Network", "Device",
           "Settings", "Trace", "CaptureError", "InputError", "compile_online", "OnlineModel"]
__version__ = "0.1.0"
