"""Stage executors, one module per kind. Each exposes ``run(ctx, names)`` and reports each finished stage
with ``ctx.finish(name, outputs, extra)``. Heavy libraries are imported inside ``run`` only.
"""
