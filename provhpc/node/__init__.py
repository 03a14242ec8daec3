"""The node side: the aggregator that streams segments into HDF5 partitions, telemetry
sampling, and ``recover`` for what a killed aggregator left.

Imports ``provhpc.format`` only.
"""

__all__: list[str] = []
