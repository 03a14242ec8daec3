"""The rank side: the capture API (``provhpc.task``, ``metric``, ...), the agent that
batches records into shared memory, and the C hot path ``_fast``.

Imports ``provhpc.format`` only.
"""

__all__: list[str] = []
