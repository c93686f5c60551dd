"""The edge's sync and spool gauges stay current while the learner is unreachable: they are what the
sync-stale and spool alerts read, and during an outage the uploader only backs off."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

from prometheus_client import REGISTRY

from edge import metrics
from edge.link import Heartbeat, LearnerAddress, SyncClock, update_link_metrics
from edge.spool import HEADER_SIZE, Spool

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


def test_quarantined_spool_files_have_a_gauge_and_a_counter(tmp_path, monkeypatch):
    """Records lost to corruption: the gauge counts the files in quarantine/ (they stay there, so it
    survives restarts), the counter what this process moved; both are exported at 0 from the open."""
    robot = "quarantine-metrics-robot"

    def value(name, robot_id=robot):
        return REGISTRY.get_sample_value(name, {"robot_id": robot_id})

    directory = tmp_path / "spool"
    with Spool(directory, fsync=False) as spool:
        for seq in range(4):
            spool.append(seq, b"x" * 64)
    rec = sorted(p for p in directory.iterdir() if p.suffix == ".rec")
    data = bytearray(rec[1].read_bytes())
    data[HEADER_SIZE + 5] ^= 0xFF
    rec[1].write_bytes(bytes(data))

    hook = metrics.spool_quarantine_hook(robot)  # what pirl-edge passes when it opens its spool
    assert value("pirl_edge_spool_quarantined_total") == 0
    with Spool(directory, fsync=False, on_quarantine=hook) as spool:  # a restart after a crash
        assert (directory / "quarantine" / rec[1].name).is_file()
        metrics.update_spool_quarantine(robot, spool)  # as pirl-edge does right after the open
        assert value("pirl_edge_spool_quarantine_files") == 1
        assert value("pirl_edge_spool_quarantined_total") == 1
        # corruption found when the uploader reads: the next refresh shows it
        data = bytearray(rec[3].read_bytes())
        data[-1] ^= 0xFF
        rec[3].write_bytes(bytes(data))
        assert [s for s, _ in spool.pending()] == [0, 2]
        update_link_metrics(robot, spool, SyncClock(robot))
        assert value("pirl_edge_spool_quarantine_files") == 2
        assert value("pirl_edge_spool_quarantined_total") == 2

    # the next process: the files are still there (gauge), it moved none itself (counter at 0)
    again = robot + "-restarted"
    monkeypatch.setattr(metrics, "QUARANTINE_RECOUNT_S", 3600.0)
    with Spool(directory, fsync=False, on_quarantine=metrics.spool_quarantine_hook(again)) as spool:
        metrics.update_spool_quarantine(again, spool)
        assert value("pirl_edge_spool_quarantine_files", again) == 2
        assert value("pirl_edge_spool_quarantined_total", again) == 0
        # an operator inspects and removes them: the directory is recounted (every few seconds;
        # at once here) and the gauge, which the alert reads, drops without a restart
        for f in (directory / "quarantine").iterdir():
            f.unlink()
        update_link_metrics(again, spool, SyncClock(again))
        assert value("pirl_edge_spool_quarantine_files", again) == 2  # not recounted yet
        monkeypatch.setattr(metrics, "QUARANTINE_RECOUNT_S", 0.0)
        update_link_metrics(again, spool, SyncClock(again))
        assert value("pirl_edge_spool_quarantine_files", again) == 0
        assert value("pirl_edge_spool_quarantined_total", again) == 0
