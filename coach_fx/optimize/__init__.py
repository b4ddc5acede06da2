"""Offline optimizer: every strategy maps a ``Problem`` (LayerDAG + network + accuracy oracle)
to a ``Plan`` on the same DAG and the same cost model.

Strategies are registered (``register``) where they are defined, as :class:`Strategy` records
that say what the driver gives them: whether their plans may code their crossings (tensor
codecs, then per-tensor widths), whether they need the accuracy oracle, what they take from the
settings, whether a varying trace refines their plan. Adding a strategy is a file that defines
its function and registers it, and its import below.

Example::

    >>> plan = solve("brute-force", Problem(dag, Network(10)))    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from coach_fx.optimize.problem import Problem, better
from coach_fx.plan import Plan


@dataclass(frozen=True)
class Strategy:
    """A planning strategy as the driver runs it."""

    name: str
    run: Callable[..., Plan]
    #: its plans may code their quantized crossings (``Settings.tensor_codecs``) and then give
    #: each crossing its own width (``Settings.per_tensor_bits``): coach's own searches
    codes: bool = False
    #: whether it needs the accuracy oracle (a plan with nothing lossy does not)
    needs_oracle: bool = True
    #: its keyword arguments from the settings (``Settings`` -> kwargs)
    options: Callable[[Any], dict] = field(default=lambda settings: {})
    #: a varying trace refines its plan across the trace's rates (``optimize.trace``)
    trace_aware: bool = False
    #: listed by ``coach plan --strategy all``
    compared: bool = True


#: name -> strategy, in registration order
STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to :data:`STRATEGIES` (a name registered twice is a ``ValueError``).

    >>> register(Strategy("mine", my_planner, needs_oracle=False))    # doctest: +SKIP
    """
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is registered twice")
    STRATEGIES[strategy.name] = strategy
    return strategy


def solve(strategy: str, problem: Problem, **kw: Any) -> Plan:
    """Run one named strategy (see ``STRATEGIES``)."""
    try:
        fn = STRATEGIES[strategy].run
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of "
                         f"{sorted(STRATEGIES) + ['manual']}") from None
    return fn(problem, **kw)


# the strategies register themselves where they are defined (the functions are also exported
# under their names, for tests and benchmarks that call them directly)
from coach_fx.optimize.coach import coach  # noqa: E402
from coach_fx.optimize import baselines as _baselines  # noqa: E402,F401
from coach_fx.optimize import simple as _simple  # noqa: E402,F401
from coach_fx.optimize.brute_force import brute_force  # noqa: E402


def compared() -> tuple[str, ...]:
    """The strategies ``coach plan --strategy all`` compares, in registration order."""
    return tuple(name for name, s in STRATEGIES.items() if s.compared)


__all__ = ["Problem", "STRATEGIES", "Strategy", "better", "brute_force", "coach", "compared", "register", "solve"]
