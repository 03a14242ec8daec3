"""Frames between a rank (DEALER) and its node aggregator (ROUTER).

Every message is ``[type, payload, *inline]``; the type is one byte.  Control
payloads with variable content (hello, goodbye) are JSON; the hot ones are
fixed structs.  A frame that does not parse is counted and logged by the
aggregator, never fatal.
"""

from __future__ import annotations

import json
import struct
from typing import Any

__all__ = [
    "ACK", "ACK_FMT", "BATCH", "BATCH_FMT", "FAREWELL", "GOODBYE", "HEARTBEAT", "HELLO", "NACK",
    "WELCOME", "dumps", "loads"
]

HELLO = b"H"  # rank -> agg: JSON identity and segment path
WELCOME = b"W"  # agg -> rank: JSON {"mode": "shm"|"inline"} or {"error": ...}
BATCH = b"B"  # rank -> agg: BATCH_FMT [+ records bytes, heap bytes when inline]
ACK = b"A"  # agg -> rank: ACK_FMT (slot is free again)
HEARTBEAT = b"P"  # rank -> agg: empty; keeps an inline (remote) rank alive
GOODBYE = b"G"  # rank -> agg: JSON status, counts
FAREWELL = b"F"  # agg -> rank: every record of the rank is on disk
NACK = b"N"  # agg -> rank: JSON error about a frame (informational)

BATCH_FMT = struct.Struct("<IQII")  # slot, seq, count, heap_used
ACK_FMT = struct.Struct("<IQ")  # slot, seq


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes) -> dict[str, Any]:
    obj = json.loads(bytes(data).decode())
    if not isinstance(obj, dict):
        raise ValueError("control payload is not a JSON object")
    return obj
