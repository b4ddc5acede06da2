"""Everything that runs online (installed as ``coach_fx.runtime``): links, workers, pipeline.

Layers: ``runtime`` imports ``coach_fx.passes`` (the boundary contract, the quantizer, the wire
sizes, the image codecs) and itself, never the compile side (``coach_fx``'s driver, optimizer,
accuracy oracle, networkx). Its one door into ``coach_fx`` is the deploy interface,
:data:`DEPLOY_INTERFACE`: the deploy layer (``coach_fx.deploy``: a plan directory opened into a
typed ``SavedPlan``), imported where a Ray replica loads a plan itself
(``runtime/ray_compute.py``). ``passes`` never imports ``runtime``.
"""

#: the ``coach_fx`` modules ``runtime`` may import (tests/coach_fx/test_house.py checks it)
DEPLOY_INTERFACE = ("coach_fx.deploy",)
