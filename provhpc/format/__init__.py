"""What both sides of the wire agree on: the record layout, the segment layout, the
protocol frames, the network keys, the partition schema and writer, the drop reasons.

The lowest layer: it imports nothing else of provhpc.
"""

__all__: list[str] = []
