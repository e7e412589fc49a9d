"""The train stage (``stage.run``) and its recipe: ``config`` (the slice, typed) -> ``recipe`` (setup -> fit ->
export) with ``data`` (the cache pass, the samples), ``module`` (the objective and optimizer hooks),
``callbacks`` (log and progress, EMA, sealed checkpoints) and ``previews``."""
