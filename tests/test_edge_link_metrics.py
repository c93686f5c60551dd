"""The edge's sync and spool gauges stay current while the learner is unreachable: they are what the
sync-stale and spool alerts read, and during an outage the uploader only backs off."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

from prometheus_client import REGISTRY

from edge.link import Heartbeat, LearnerAddress, SyncClock
from edge.spool import Spool

ROBOT = "link-metrics-robot"  # an id of its own: the prometheus registry is process-wide


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"robot_id": ROBOT})


def test_heartbeat_refreshes_sync_and_spool_gauges_while_the_learner_is_down(tmp_path):
    with Spool(tmp_path / "spool", fsync=False) as spool:
        for seq in range(3):
            spool.append(seq, b"x" * 100)
        clock = SyncClock(ROBOT)
        link = LearnerAddress(f"127.0.0.1:{closed_port()}", ROBOT, "token-of-the-test")
        hb = Heartbeat(link, SimpleNamespace(version=0), spool, clock, period=0.1)
        hb.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (gauge("pirl_edge_seconds_since_last_sync") or 0) < 1.0:
                time.sleep(0.1)
            first = gauge("pirl_edge_seconds_since_last_sync")
            assert first is not None and first >= 1.0  # grows although no call succeeds
            assert gauge("pirl_edge_spool_records") == 3
            assert gauge("pirl_edge_spool_bytes") > 0
            assert gauge("pirl_edge_spool_oldest_record_age_seconds") > 0
            spool.append(3, b"y" * 100)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and gauge("pirl_edge_spool_records") != 4:
                time.sleep(0.1)
            assert gauge("pirl_edge_spool_records") == 4
            assert gauge("pirl_edge_seconds_since_last_sync") > first
            assert hb.sent == 0
        finally:
            hb.stop()
