"""Stage executors, one module per kind, declared in ``registry.py``. Each exposes ``run(ctx, jobs)``, a
generator that yields a ``registry.Result`` per finished stage. Heavy libraries are imported inside ``run`` only.
"""
