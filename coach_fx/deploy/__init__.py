"""The deploy layer: plan directories, between compile time and run time.

``coach_fx.deploy.save`` writes one (``cm.save``, ``om.save``); ``open_plan`` opens one once,
its manifest verified, into a typed :class:`SavedPlan` for the side that runs it. ``coach
serve``, ``coach run`` (``coach_fx.deploy.cli``), ``coach_fx.serve``, ``coach_fx.connect`` and
the Ray replicas read plan directories only through it; nothing else parses a plan file.

    files       the manifest and the one verified reader of a directory's files
    graphfile   a half as its exported graph (JSON, allow-listed operators) and raw tensors
    graph_ops   the operators a saved graph may call
    schema      each record's JSON (the plan files' schema, checked as it is read)
    save        writing a compiled plan's and an online model's directory
    saved_plan  SavedPlan, and open_plan, its one builder
    inputs      frames for a saved plan's inputs (synthetic, or the user's files)
    cli         ``coach serve`` and ``coach run``

This package imports ``coach_fx.runtime`` and ``coach_fx.passes``, never the optimizer or
networkx: ``runtime`` may import it (``runtime.DEPLOY_INTERFACE``), the compile side writes
through it.

Example::

    >>> from coach_fx.deploy import open_plan
    >>> saved = open_plan("plan_dir", "end", key=token)           # doctest: +SKIP
    >>> saved.kind, saved.inputs                                  # doctest: +SKIP
"""

from coach_fx.deploy.files import ArtifactError
from coach_fx.deploy.saved_plan import SavedPlan, open_plan
from coach_fx.deploy.schema import InputSpec

__all__ = ["ArtifactError", "InputSpec", "SavedPlan", "open_plan"]
