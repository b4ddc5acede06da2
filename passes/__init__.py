"""fx transformations (installed as ``coach_fx.passes``): capture, annotate, partition, and the
``coach::`` boundary ops. Each applies a plan; none decides anything."""
