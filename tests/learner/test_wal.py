"""The learner's write-ahead log: intact entries replay in order, a torn or corrupt tail is cut."""

from learner.wal import RecordLog, encode_entry, read_entries


def test_replay_and_torn_tail(tmp_path):
    log = RecordLog(tmp_path)
    log.start_segment(0)
    for i in range(3):
        log.append(f"robot-{i}", bytes([i]) * (10 + i))
    log.start_segment(1)
    log.append("robot-9", b"later")
    log.close()
    assert list(log.replay(0)) == [
        ("robot-0", b"\x00" * 10),
        ("robot-1", b"\x01" * 11),
        ("robot-2", b"\x02" * 12),
        ("robot-9", b"later"),
    ]
    assert list(log.replay(1)) == [("robot-9", b"later")]

    seg = tmp_path / "after-000000.log"
    full = seg.read_bytes()
    last = len(encode_entry("robot-2", b"\x02" * 12))
    for cut in range(1, last):  # every torn length of the last entry leaves the first two intact
        seg.write_bytes(full[:-cut])
        assert [r for r, _ in read_entries(seg)] == ["robot-0", "robot-1"]
    corrupt = bytearray(full)
    corrupt[-5] ^= 1  # a flipped bit in the last record: its crc fails
    seg.write_bytes(bytes(corrupt))
    assert [r for r, _ in read_entries(seg)] == ["robot-0", "robot-1"]

    seg.write_bytes(full[:-3])
    log.start_segment(0)  # reopening cuts the torn tail before appending
    log.append("robot-3", b"new")
    log.close()
    assert [r for r, _ in read_entries(seg)] == ["robot-0", "robot-1", "robot-3"]
    log.drop_before(1)
    assert not seg.exists() and log.segments() == [1]


def test_the_entry_format_is_unchanged_by_the_incremental_crc(tmp_path):
    """Logs written before the crc became incremental replay: the entry is still u32 len, robot id, u32 len,
    record, u32 crc32(robot id + record), and append writes exactly encode_entry's bytes."""
    import struct
    import zlib

    robot, rec = b"robot-7", bytes(range(256)) * 300
    old = b"".join(
        (
            struct.pack("<I", len(robot)),
            robot,
            struct.pack("<I", len(rec)),
            rec,
            struct.pack("<I", zlib.crc32(robot + rec)),
        )
    )
    assert encode_entry("robot-7", rec) == old
    log = RecordLog(tmp_path)
    log.start_segment(0)
    log.append("robot-7", rec)
    log.close()
    assert (tmp_path / "after-000000.log").read_bytes() == old
