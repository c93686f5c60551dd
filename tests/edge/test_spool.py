"""Tests of the edge rollout spool (edge/spool.py): ordering, acks, restarts, kill -9, corruption, limits,
concurrency, ages."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import edge.spool as spool_mod
from edge.spool import HEADER_SIZE, Spool, SpoolClosedError, SpoolFullError, SpoolLockedError

REPO = Path(__file__).resolve().parents[2]


def payload_for(seq: int, size: int = 32) -> bytes:
    """A payload that embeds its sequence number, like a RolloutRecord does."""
    head = f"rec:{seq}:".encode()
    return head + bytes((seq + i) % 251 for i in range(max(0, size - len(head))))


def record_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".rec"))


def test_append_pending_order_and_ack(tmp_path):
    with Spool(tmp_path, fsync=False) as sp:
        seqs = [sp.allocate_and_append(payload_for) for _ in range(5)]
        assert seqs == [0, 1, 2, 3, 4]
        assert record_files(tmp_path) == sorted(record_files(tmp_path))  # names sort in sequence order
        assert [s for s, _ in sp.pending()] == seqs
        assert all(p == payload_for(s) for s, p in sp.pending())
        assert [s for s, _ in sp.pending(after=1)] == [2, 3, 4]
        assert [s for s, _ in sp.pending(after=1, limit=2)] == [2, 3]
        assert sp.pending(limit=0) == []

        assert sp.ack(2) is True
        assert sp.ack(2) is False  # idempotent
        assert sp.ack(12345) is False  # unknown: no-op
        assert [s for s, _ in sp.pending()] == [0, 1, 3, 4]
        assert sp.ack_upto(3) == 3
        assert [s for s, _ in sp.pending()] == [4]
        st = sp.stats()
        assert st["records"] == 1 and st["bytes"] == HEADER_SIZE + 32 and st["next_sequence"] == 5
        assert sp.get(4) == payload_for(4) and sp.get(0) is None

        sp.append(10, b"explicit")  # tools/tests: explicit sequence, gaps allowed
        with pytest.raises(ValueError):
            sp.append(7, b"going back")
        assert sp.allocate_and_append(payload_for) == 11
    with pytest.raises(SpoolClosedError):
        sp.pending()


def test_reopen_keeps_unacked_and_continues_sequence(tmp_path):
    with Spool(tmp_path) as sp:
        for _ in range(4):
            sp.allocate_and_append(lambda s: payload_for(s, 100))
        sp.ack(1)
        with pytest.raises(SpoolLockedError):  # one Spool per directory at a time
            Spool(tmp_path)
    with Spool(tmp_path) as sp:
        assert [s for s, _ in sp.pending()] == [0, 2, 3]
        assert all(p == payload_for(s, 100) for s, p in sp.pending())
        assert sp.stats()["records"] == 3 and sp.stats()["bytes"] == 3 * (HEADER_SIZE + 100)
        assert sp.allocate_and_append(payload_for) == 4
        # ack everything, including the newest record: the numbers must still not be reused
        assert sp.ack_upto(10**6) == 4
        assert record_files(tmp_path) == []
        assert sp.stats()["records"] == 0
    with Spool(tmp_path) as sp:
        assert sp.stats()["next_sequence"] == 5
        assert sp.allocate_and_append(payload_for) == 5
        sp.ack(5)
    with Spool(tmp_path) as sp:
        assert sp.allocate_and_append(payload_for) == 6
        assert sp.advance_sequence(100) == 100  # e.g. the learner has seen more than we have
        sp.ack(6)
    with Spool(tmp_path) as sp:
        assert sp.allocate_and_append(payload_for) == 100


_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from edge.spool import Spool

    def payload(seq):
        head = b"rec:%d:" % seq
        return head + bytes((seq + i) % 251 for i in range(int(sys.argv[3]) - len(head)))

    sp = Spool(sys.argv[1])
    while True:
        seq = sp.allocate_and_append(payload)
        print("A", seq, flush=True)
        if seq % 3 == 0:
            sp.ack(seq)
            print("K", seq, flush=True)
""")


@pytest.mark.parametrize("n_before_kill,size", [(15, 20_000), (40, 3_000)])
def test_sigkill_mid_run_loses_no_returned_record(tmp_path, n_before_kill, size):
    d = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(d), str(REPO), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        while len(lines) < n_before_kill:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"child died early: {proc.stderr.read()}")
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        # read the rest through the same buffered stream: readline() may already hold lines it read ahead,
        # which communicate() (reading the raw pipe) would never see
        rest = proc.stdout.read()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lines += rest.splitlines(keepends=True)
    appended = {int(line.split()[1]) for line in lines if line.endswith("\n") and line.startswith("A ")}
    acked = {int(line.split()[1]) for line in lines if line.endswith("\n") and line.startswith("K ")}
    assert len(appended) >= n_before_kill // 2

    with Spool(d) as sp:
        st = sp.stats()
        assert st["quarantined"] == 0
        assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
        pending = dict(sp.pending())
        last = max(appended)
        for seq in appended - acked:
            if seq == last and seq % 3 == 0 and seq not in pending:
                continue  # killed after its ack returned but before the child printed "K"
            assert pending.get(seq) == payload_for(seq, size), f"record {seq} lost or damaged"
        assert not (acked & pending.keys())
        # at most the one record whose append returned after the child's last print
        assert set(pending) - appended <= {last + 1}
        assert st["next_sequence"] > last
        assert sp.allocate_and_append(payload_for) > last


def test_corrupted_and_truncated_files_are_quarantined(tmp_path, caplog):
    with Spool(tmp_path, fsync=False) as sp:
        for _ in range(5):
            sp.allocate_and_append(lambda s: payload_for(s, 64))
    files = record_files(tmp_path)
    # 1: truncated (torn write); 3: payload bit flip; 4 (the newest): garbage header
    p1, p3, p4 = (tmp_path / files[i] for i in (1, 3, 4))
    p1.write_bytes(p1.read_bytes()[: HEADER_SIZE + 10])
    data = bytearray(p3.read_bytes())
    data[-1] ^= 0x01
    p3.write_bytes(bytes(data))
    p4.write_bytes(b"not a record")

    with caplog.at_level(logging.WARNING, logger="edge.spool"), Spool(tmp_path, fsync=False) as sp:
        assert [s for s, _ in sp.pending()] == [0, 2]
        st = sp.stats()
        assert st["quarantined"] == 3 and st["records"] == 2
        assert st["next_sequence"] == 5  # a quarantined number is not reused either
    assert sum("quarantined" in r.getMessage() for r in caplog.records) == 3
    q = tmp_path / "quarantine"
    assert sorted(p.name for p in q.iterdir()) == [files[1], files[3], files[4]]
    assert (q / files[4]).read_bytes() == b"not a record"  # kept as evidence, not deleted
    # still counted, still not loaded, sequence still not reused after a further reopen
    with Spool(tmp_path, fsync=False) as sp:
        assert sp.stats()["quarantined"] == 3
        assert sp.allocate_and_append(payload_for) == 5


def test_corruption_found_at_read_time_is_quarantined(tmp_path):
    with Spool(tmp_path, fsync=False) as sp:
        for _ in range(4):
            sp.allocate_and_append(payload_for)
        p = tmp_path / record_files(tmp_path)[1]
        data = bytearray(p.read_bytes())
        data[HEADER_SIZE + 3] ^= 0xFF
        p.write_bytes(bytes(data))
        assert [s for s, _ in sp.pending(limit=2)] == [0, 2]  # skips 1 and still fills the limit
        st = sp.stats()
        assert st["quarantined"] == 1 and st["records"] == 3 and st["bytes"] == 3 * (HEADER_SIZE + 32)
        assert (tmp_path / "quarantine" / p.name).exists()
        assert sp.ack(1) is False


def test_on_quarantine_hook_sees_every_move_and_cannot_break_the_spool(tmp_path, caplog):
    with Spool(tmp_path, fsync=False) as sp:
        for _ in range(4):
            sp.allocate_and_append(payload_for)
    files = record_files(tmp_path)
    (tmp_path / files[0]).write_bytes(b"torn")  # found at open
    moved: list[Path] = []
    with Spool(tmp_path, fsync=False, on_quarantine=moved.append) as sp:
        assert moved == [tmp_path / "quarantine" / files[0]]
        p = tmp_path / files[2]
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF
        p.write_bytes(bytes(data))
        assert [s for s, _ in sp.pending()] == [1, 3]  # found at read
        assert moved == [tmp_path / "quarantine" / files[0], tmp_path / "quarantine" / files[2]]
    # files already in quarantine/ at open are not moves; a failing hook is logged, the open succeeds
    (tmp_path / files[3]).write_bytes(b"torn too")

    def failing(dest):
        raise RuntimeError("metrics down")

    with caplog.at_level(logging.ERROR, logger="edge.spool"), Spool(tmp_path, fsync=False, on_quarantine=failing) as sp:
        assert [s for s, _ in sp.pending()] == [1]
        assert sp.stats()["quarantined"] == 3
    assert any("on_quarantine hook failed" in r.getMessage() for r in caplog.records)


def test_temp_leftovers_removed_on_open(tmp_path):
    with Spool(tmp_path, fsync=False) as sp:
        sp.allocate_and_append(payload_for)
    (tmp_path / "00000000000000000001.rec.0123456789ab.tmp").write_bytes(b"half a rec")
    (tmp_path / "spool.hwm.deadbeef0000.tmp").write_bytes(b"x")
    with Spool(tmp_path, fsync=False) as sp:
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert [s for s, _ in sp.pending()] == [0]
        assert sp.stats()["quarantined"] == 0
        assert sp.allocate_and_append(payload_for) == 2  # the interrupted write's number is not reissued


def test_spool_full_on_both_limits_consumes_no_sequence(tmp_path):
    size = HEADER_SIZE + 32
    with Spool(tmp_path / "n", max_records=3, fsync=False) as sp:
        assert [sp.allocate_and_append(payload_for) for _ in range(3)] == [0, 1, 2]
        calls = []
        with pytest.raises(SpoolFullError, match=r"3/3 records") as ei:
            sp.allocate_and_append(lambda s: calls.append(s) or payload_for(s))
        assert calls == []  # refused before the record was even built
        assert ei.value.records == 3 and ei.value.max_records == 3
        assert sp.stats()["next_sequence"] == 3 and sp.stats()["records"] == 3
        sp.ack(0)
        assert sp.allocate_and_append(payload_for) == 3  # no gap

    with Spool(tmp_path / "b", max_bytes=2 * size + HEADER_SIZE + 4, fsync=False) as sp:
        assert [sp.allocate_and_append(payload_for) for _ in range(2)] == [0, 1]
        with pytest.raises(SpoolFullError, match=rf"{2 * size}/{2 * size + HEADER_SIZE + 4} bytes") as ei:
            sp.allocate_and_append(payload_for)
        assert ei.value.record_bytes == size and ei.value.bytes == 2 * size
        with pytest.raises(SpoolFullError):  # a record bigger than the whole spool
            sp.allocate_and_append(lambda s: b"x" * (3 * size))
        assert sp.stats()["next_sequence"] == 2
        assert sp.allocate_and_append(lambda s: b"tiny") == 2  # fits exactly in what is left
        assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    with Spool(tmp_path / "b", max_bytes=2 * size + HEADER_SIZE + 4, fsync=False) as sp:
        assert sp.stats()["next_sequence"] == 3


def test_make_payload_error_stores_nothing(tmp_path):
    with Spool(tmp_path, fsync=False) as sp:
        with pytest.raises(RuntimeError):
            sp.allocate_and_append(lambda s: (_ for _ in ()).throw(RuntimeError("boom")))
        assert sp.stats()["records"] == 0
        assert sp.allocate_and_append(payload_for) == 0


def test_concurrent_append_and_ack_keep_counts_consistent(tmp_path):
    n = 600
    sp = Spool(tmp_path, max_records=16, fsync=False)
    appended, acked, refused = [], [], [0]
    done = threading.Event()
    errors = []

    def producer():
        try:
            while len(appended) < n:
                try:
                    appended.append(sp.allocate_and_append(lambda s: payload_for(s, 16 + s % 50)))
                except SpoolFullError:
                    refused[0] += 1
                    time.sleep(0.0005)
        except Exception as e:  # pragma: no cover
            errors.append(e)
        finally:
            done.set()

    def uploader():
        try:
            last = None
            while not (done.is_set() and sp.stats()["records"] == 0):
                batch = sp.pending(after=last, limit=16)
                for s, p in batch:
                    assert p == payload_for(s, 16 + s % 50)
                if not batch:
                    time.sleep(0.0002)
                else:
                    last = batch[-1][0]
                    # ack out of order and sometimes twice, like a real ack stream with resends
                    for s, _ in reversed(batch):
                        if sp.ack(s):
                            acked.append(s)
                        sp.ack(s)
                st = sp.stats()
                assert 0 <= st["records"] <= 16 and st["bytes"] >= 0
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=producer), threading.Thread(target=uploader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert appended == list(range(n))  # strictly increasing, refusals consumed nothing
    assert sorted(acked) == appended  # every record acked exactly once
    st = sp.stats()
    assert st["records"] == 0 and st["bytes"] == 0 and st["next_sequence"] == n
    assert record_files(tmp_path) == []
    sp.close()


def test_stats_ages(tmp_path, monkeypatch):
    clock = {"wall": 1_000_000.0, "mono": 50.0}
    monkeypatch.setattr(spool_mod, "_wall_clock", lambda: clock["wall"])
    monkeypatch.setattr(spool_mod, "_monotonic", lambda: clock["mono"])
    with Spool(tmp_path, fsync=False) as sp:
        assert sp.stats()["oldest_age_s"] == 0.0  # empty
        sp.allocate_and_append(payload_for)  # written at wall 1_000_000
        clock["wall"] += 10
        clock["mono"] += 10
        sp.allocate_and_append(payload_for)  # written at wall 1_000_010
        clock["wall"] += 5
        clock["mono"] += 5
        assert sp.stats()["oldest_age_s"] == pytest.approx(15)
        clock["wall"] -= 3600  # wall clock stepped back: ages are monotonic
        assert sp.stats()["oldest_age_s"] == pytest.approx(15)
        clock["wall"] += 3600
        sp.ack(0)
        assert sp.stats()["oldest_age_s"] == pytest.approx(5)

    # after a restart the age comes from the wall-clock write time in the header
    clock["wall"] += 100
    clock["mono"] = 7.0
    with Spool(tmp_path, fsync=False) as sp:
        assert sp.stats()["oldest_age_s"] == pytest.approx(105)
        clock["mono"] += 2
        assert sp.stats()["oldest_age_s"] == pytest.approx(107)
    # a write time in the future (clock went back across the restart) gives age 0, not negative
    clock["wall"] = 500_000.0
    with Spool(tmp_path, fsync=False) as sp:
        assert sp.stats()["oldest_age_s"] == 0.0


def test_real_clock_age_is_positive(tmp_path):
    with Spool(tmp_path, fsync=False) as sp:
        sp.allocate_and_append(payload_for)
        time.sleep(0.02)
        assert sp.stats()["oldest_age_s"] >= 0.02


def test_header_only_open_checks_payload_at_read(tmp_path):
    with Spool(tmp_path, fsync=False) as sp:
        for _ in range(3):
            sp.allocate_and_append(payload_for)
    p = tmp_path / record_files(tmp_path)[0]
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x10
    p.write_bytes(bytes(data))
    with Spool(tmp_path, fsync=False, verify_on_open=False) as sp:
        assert sp.stats()["records"] == 3  # header and size are fine
        assert [s for s, _ in sp.pending()] == [1, 2]  # the crc catches it at read time
        assert sp.stats()["quarantined"] == 1 and sp.stats()["records"] == 2
