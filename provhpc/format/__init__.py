"""What both sides of the wire agree on: the record layout, the segment layout, the
protocol frames, the network keys, the partition schema and writer, the drop reasons, and
whether a recorded process (pid, and when it was seen) still runs.

The lowest layer: it imports nothing else of provhpc.
"""

__all__: list[str] = []
