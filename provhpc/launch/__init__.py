"""``provhpc run``: the session of a rank (configuration, identity, environment,
rendezvous with the node aggregator) and the program runner.

Imports ``provhpc.capture`` and ``provhpc.format``.
"""

__all__: list[str] = []
