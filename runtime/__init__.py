"""Everything that runs online (installed as ``coach_fx.runtime``): links, workers, pipeline."""
