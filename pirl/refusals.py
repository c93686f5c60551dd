"""How the learner tells a robot that it judged one record, and how the robot reads that.

A stream can end with an error for many reasons: the learner refused the record it was reading
(malformed, invalid, from another robot, too old, too large), or something that says nothing about
the record at all: gRPC's own ``RESOURCE_EXHAUSTED`` when the server has no free call slot
("Concurrent RPC limit exceeded"), a per-robot stream limit, an idle stream closed, a restart, a
network fault. Status codes alone cannot tell these apart, and an edge that deletes a record on the
wrong one loses good data. So the learner marks every refusal of a record it has judged with
trailing metadata naming the reason (and the record's sequence when it could read it); the edge
drops a record only when that marker is present and names the record it expects. Everything else
keeps the record and retries with backoff.
"""

from __future__ import annotations

import grpc

# every reason the learner refuses a record with (the label values of both sides' refusal counters)
REASONS = (
    "malformed",
    "oversized",
    "invalid",
    "robot_mismatch",
    "future_version",
    "stale_version",
    "sequence_ahead",
    "no_outcome",
)

# trailing-metadata keys (gRPC metadata keys are lower case)
REFUSED_RECORD = "pirl-refused-record"  # the reason the learner refused the record it was reading
REFUSED_SEQUENCE = "pirl-refused-sequence"  # that record's sequence, when it could be parsed


def refusal_metadata(reason: str, sequence: int | None) -> tuple[tuple[str, str], ...]:
    """Trailing metadata the learner sets before aborting a stream over one record it judged."""
    md = [(REFUSED_RECORD, reason)]
    if sequence is not None:
        md.append((REFUSED_SEQUENCE, str(sequence)))
    return tuple(md)


def judged_record(error: grpc.RpcError) -> tuple[str, int | None] | None:
    """(reason, sequence or None) when the learner marked ``error`` as its judgement of one record;
    None for every other error (transport limits, restarts, network faults: the record is kept)."""
    try:
        md = dict(error.trailing_metadata() or ())
    except Exception:  # noqa: BLE001  an error raised before any response has no metadata to read
        return None
    reason = md.get(REFUSED_RECORD)
    if not reason:
        return None
    try:
        sequence = int(md[REFUSED_SEQUENCE]) if REFUSED_SEQUENCE in md else None
    except ValueError:
        sequence = None
    return (reason if reason in REASONS else "other"), sequence  # a label value: never free text
