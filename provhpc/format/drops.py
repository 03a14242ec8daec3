"""The drop reasons: why a record never reached its partition.

One table serves the rank's segment counters (a reason's index is its u64
counter in the segment header, see ``segment.DROPS_OFFSET``), the aggregator's
``/drops`` rows (a reason's name is the ``reason`` column) and the partition
attribute ``drop_reasons``; docs/format.md and docs/reliability.md list the
same names.  Every reason here is counted somewhere:

* ``backpressure`` (rank, ``Agent.count_drop``): every slot was taken for longer
  than ``PROVHPC_BACKPRESSURE_TIMEOUT``;
* ``no_aggregator`` (rank, ``Agent.count_drop``): the node aggregator never
  answered or went away, and the segment is full;
* ``aggregator_write`` (aggregator, ``Aggregator._lose``): the aggregator could
  not write the records (a full or read-only file system);
* ``bad_value`` (rank, ``Agent.bad_value``): a metric value that is not a number
  or a step that is not an integer in int64 (docs/format.md, "Values"): data never
  raises, the point is dropped and counted.

Indexes 2 and 3 were named ``after_shutdown`` and ``encode`` (the
``drop_reasons`` attribute of older partitions lists them), but nothing ever
counted them (a call after shutdown records nothing, a value that cannot be
encoded is kept as its type name, flag ``rejected``).
They stay reserved so that a segment counter keeps its meaning.
"""

from __future__ import annotations

BACKPRESSURE = 0
NO_AGGREGATOR = 1
AGGREGATOR_WRITE = 4
BAD_VALUE = 5

#: reason name by segment counter index (the counted reasons only)
REASONS: dict[int, str] = {
    BACKPRESSURE: "backpressure",
    NO_AGGREGATOR: "no_aggregator",
    AGGREGATOR_WRITE: "aggregator_write",
    BAD_VALUE: "bad_value",
}
#: the names, in index order (the partition attribute ``drop_reasons``)
DROP_REASONS: tuple[str, ...] = tuple(REASONS[i] for i in sorted(REASONS))
#: u64 counters the segment header has room for
NREASONS = 16

__all__ = ["BACKPRESSURE", "NO_AGGREGATOR", "AGGREGATOR_WRITE", "BAD_VALUE", "REASONS",
           "DROP_REASONS", "NREASONS"]
