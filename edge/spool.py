"""Crash-safe on-disk spool of rollout records (docs/runtime.md, "One rollout's life", step 4).

Every rollout record the robot produces goes here first; the uploader streams records to the learner
and deletes each one only after the learner acked it. Unacked records survive crashes (kill -9),
restarts and learner outages.

Layout of ``directory``::

    00000000000000000042.rec    one record per file, named by its zero-padded sequence number
    *.tmp                       a write in progress (removed on open: such a write never returned)
    spool.hwm                   high-water mark: a lower bound for the next sequence number
    spool.lock                  flock'ed while a Spool has the directory open (one process at a time)
    quarantine/                 torn or corrupted files, moved aside (never loaded, never deleted)

A record file is a fixed header followed by the payload (opaque bytes, a serialized RolloutRecord)::

    magic b"PIRS" | format u16 | header size u16 | sequence u64 | payload length u64
    | wall-clock write time f64 | crc32(payload) u32 | crc32(header bytes before this field) u32

(little-endian). A file is written to a temporary name in the same directory, flushed and fsync'ed,
renamed (``os.replace``) to its final name, and the directory is fsync'ed, so after a crash a record
file is either complete or absent. A file that fails its checks anyway (disk corruption, a power loss
on a file system that does not order these writes) is moved to ``quarantine/`` with a warning.

Sequence numbers are per spool, start at 0, are strictly increasing and are never reused: not after
a record was acked and deleted, and not after a restart. The high-water mark file is made durable
before any record file is deleted (acked) or quarantined, and on open the next sequence number is
``max(high-water mark, 1 + the largest sequence number found in the directory or quarantine/)``. A
sequence number is consumed only by a record that reached the disk (or whose write failed half-way);
a refused append (``SpoolFullError``) consumes none.

Thread safety: one lock guards the in-memory index (sequence -> size, write time). File writes,
file reads for ``pending()`` and the high-water-mark writes happen outside it, so the control thread
that appends and the uploader thread that reads and acks do not wait on each other's disk I/O.
Appends are serialised among themselves (sequence numbers reach the index in order).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

try:  # POSIX only; without it the single-process guard is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = [
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolClosedError",
    "SpoolLockedError",
    "RECORD_SUFFIX",
    "HEADER_SIZE",
]

MAGIC = b"PIRS"
FORMAT_VERSION = 1
# magic, format, header size, sequence, payload length, write time (unix s), payload crc32, header crc32
_HEADER = struct.Struct("<4sHHQQdII")
HEADER_SIZE = _HEADER.size  # 40
_HEADER_CRC_SPAN = HEADER_SIZE - 4

_HWM_MAGIC = b"PIRH"
_HWM = struct.Struct("<4sHHQI")  # magic, format, reserved, next sequence, crc32 of the bytes before it

RECORD_SUFFIX = ".rec"
TMP_SUFFIX = ".tmp"
HWM_NAME = "spool.hwm"
LOCK_NAME = "spool.lock"
QUARANTINE_DIR = "quarantine"
_SEQ_DIGITS = 20  # enough for any u64
_RECORD_RE = re.compile(rf"^(\d{{{_SEQ_DIGITS}}})\.rec$")
_LEADING_SEQ_RE = re.compile(rf"^(\d{{{_SEQ_DIGITS}}})\.")
_MAX_SEQ = (1 << 63) - 1  # the wire type is int64

# indirections so tests can move the clocks
_wall_clock = time.time
_monotonic = time.monotonic


class SpoolError(Exception):
    """Base class of spool errors."""


class SpoolFullError(SpoolError):
    """The record was refused because the spool is at its record-count or byte limit.

    No sequence number was consumed; the caller counts the refusal (a metric) and carries on.
    """

    def __init__(
        self,
        message: str,
        *,
        records: int,
        bytes_: int,
        max_records: int,
        max_bytes: int,
        record_bytes: int | None = None,
    ):
        super().__init__(message)
        self.records = records
        self.bytes = bytes_
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.record_bytes = record_bytes


class SpoolClosedError(SpoolError):
    """The spool was used after close()."""


class SpoolLockedError(SpoolError):
    """Another Spool (this process or another one) has the directory open."""


class _CorruptError(Exception):
    pass


def _record_name(seq: int) -> str:
    return f"{seq:0{_SEQ_DIGITS}d}{RECORD_SUFFIX}"


def _encode(seq: int, payload: bytes, wall_time: float) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, seq, len(payload), wall_time, zlib.crc32(payload), 0)[
        :_HEADER_CRC_SPAN
    ]
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def _decode_header(head: bytes, expected_seq: int, file_size: int) -> tuple[int, float, int]:
    """Check a header; return (payload length, wall-clock write time, payload crc32)."""
    if len(head) < HEADER_SIZE:
        raise _CorruptError(f"truncated header ({len(head)} of {HEADER_SIZE} bytes)")
    magic, fmt, hsize, seq, plen, wall, pcrc, hcrc = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise _CorruptError(f"bad magic {magic!r}")
    if zlib.crc32(head[:_HEADER_CRC_SPAN]) != hcrc:
        raise _CorruptError("header crc mismatch")
    if fmt != FORMAT_VERSION:
        raise _CorruptError(f"unknown format version {fmt}")
    if hsize != HEADER_SIZE:
        raise _CorruptError(f"unexpected header size {hsize}")
    if seq != expected_seq:
        raise _CorruptError(f"header sequence {seq} does not match the file name ({expected_seq})")
    if HEADER_SIZE + plen != file_size:
        raise _CorruptError(f"file is {file_size} bytes, header says {HEADER_SIZE + plen} (torn or truncated)")
    return plen, wall, pcrc


def _decode(data: bytes, expected_seq: int) -> tuple[bytes, float]:
    """Check a whole record file; return (payload, wall-clock write time)."""
    plen, wall, pcrc = _decode_header(data[:HEADER_SIZE], expected_seq, len(data))
    payload = data[HEADER_SIZE:]
    if zlib.crc32(payload) != pcrc:
        raise _CorruptError("payload crc mismatch")
    return payload, wall


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Spool:
    """Bounded, crash-safe, thread-safe on-disk queue of opaque records keyed by sequence number.

    ``max_records`` / ``max_bytes`` bound what the spool holds; ``max_bytes`` counts whole files
    (``HEADER_SIZE`` + payload). ``fsync=False`` skips the fsyncs (tests and benchmarks only: the
    spool then still survives a killed process, but not a power loss). ``verify_on_open=False``
    checks only headers and file sizes on open (a faster open of a big spool); payload checksums are
    then checked when records are read. ``on_quarantine(destination)`` is called after each file
    this object moves to ``quarantine/`` (during the open too; e.g. a metric), from the thread that
    found it; an exception it raises is logged and ignored.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_records: int = 100_000,
        max_bytes: int = 1 << 30,
        fsync: bool = True,
        verify_on_open: bool = True,
        on_quarantine: Callable[[Path], None] | None = None,
    ):
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if max_bytes < HEADER_SIZE + 1:
            raise ValueError(f"max_bytes must be > {HEADER_SIZE}, got {max_bytes}")
        self.directory = Path(directory)
        self.max_records = int(max_records)
        self.max_bytes = int(max_bytes)
        self._fsync = bool(fsync)
        self._qdir = self.directory / QUARANTINE_DIR
        self._on_quarantine = on_quarantine

        self._lock = threading.Lock()  # the index below
        self._append_lock = threading.Lock()  # serialises appends
        self._hwm_lock = threading.Lock()  # serialises high-water-mark writes
        # index: seq -> (file bytes, monotonic-clock write time); _order holds the seqs in ascending
        # order, acked ones are dropped lazily (skipped, compacted from time to time)
        self._index: dict[int, tuple[int, float]] = {}
        self._order: list[int] = []
        self._head = 0
        self._bytes = 0
        self._next_seq = 0
        self._hwm_durable = 0  # every seq below this is covered by the durable high-water mark
        self._quarantined = 0
        self._closed = False
        self._dir_fd: int | None = None
        self._lock_fd: int | None = None

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise SpoolLockedError(
                            f"spool {self.directory} is already open (by this or another process)"
                        ) from e
                    raise
            self._dir_fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            self._load(verify_on_open)
        except BaseException:
            self._release_fds()
            raise

    # ------------------------------------------------------------------ open

    def _load(self, verify: bool) -> None:
        max_seen = -1
        found: list[int] = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(TMP_SUFFIX):
                m = _LEADING_SEQ_RE.match(name)
                if m:
                    max_seen = max(max_seen, int(m.group(1)))
                log.info("spool %s: removing leftover temporary file %s", self.directory, name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                continue
            m = _RECORD_RE.match(name)
            if m and entry.is_file(follow_symlinks=False):
                found.append(int(m.group(1)))
        if self._qdir.is_dir():
            for entry in os.scandir(self._qdir):
                self._quarantined += 1
                m = _LEADING_SEQ_RE.match(entry.name)
                if m:
                    max_seen = max(max_seen, int(m.group(1)))
        hwm = self._read_hwm()
        found.sort()
        if found:
            max_seen = max(max_seen, found[-1])
        # set before any quarantine move below, which makes the high-water mark durable first
        self._next_seq = max(hwm, max_seen + 1, 0)
        self._hwm_durable = hwm

        wall_now, mono_now = _wall_clock(), _monotonic()
        for seq in found:
            path = self.directory / _record_name(seq)
            try:
                size, wall = self._check_file(path, seq, verify)
            except _CorruptError as e:
                self._quarantine_file(path, seq, str(e))
                continue
            except FileNotFoundError:
                continue
            # age from the wall-clock write time, clamped at 0 (the clock may have gone back)
            self._index[seq] = (size, mono_now - max(0.0, wall_now - wall))
            self._order.append(seq)
            self._bytes += size

        if self._quarantined:
            log.warning("spool %s: %d file(s) in %s", self.directory, self._quarantined, self._qdir)
        self._fsync_dir()  # make the temp-file removals / quarantine moves durable
        log.info(
            "spool %s opened: %d record(s), %d bytes, next sequence %d",
            self.directory,
            len(self._index),
            self._bytes,
            self._next_seq,
        )

    @staticmethod
    def _check_file(path: Path, seq: int, verify: bool) -> tuple[int, float]:
        if verify:
            data = path.read_bytes()
            _, wall = _decode(data, seq)
            return len(data), wall
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
        _, wall, _ = _decode_header(head, seq, size)
        return size, wall

    def _read_hwm(self) -> int:
        path = self.directory / HWM_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        try:
            if len(data) != _HWM.size:
                raise _CorruptError(f"{len(data)} bytes, expected {_HWM.size}")
            magic, fmt, _, value, crc = _HWM.unpack(data)
            if magic != _HWM_MAGIC or fmt != FORMAT_VERSION or zlib.crc32(data[:-4]) != crc:
                raise _CorruptError("bad magic, version or crc")
            return int(value)
        except _CorruptError as e:
            # should not happen (atomic replace); fall back to what the files show, and keep the evidence
            log.error(
                "spool %s: high-water mark file is corrupt (%s); using the sequence numbers on disk", self.directory, e
            )
            self._quarantine_file(path, None, str(e))
            return 0

    # ------------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosedError(f"spool {self.directory} is closed")

    def _fsync_dir(self) -> None:
        if self._fsync and self._dir_fd is not None:
            os.fsync(self._dir_fd)

    def _write_atomic(self, final_name: str, data: bytes) -> None:
        tmp = self.directory / f"{final_name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / final_name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._fsync_dir()

    def _ensure_hwm(self, above: int) -> None:
        """Make the durable high-water mark > ``above`` (call before deleting/moving record ``above``)."""
        if self._hwm_durable > above:
            return
        with self._hwm_lock:
            if self._hwm_durable > above:
                return
            with self._lock:
                self._check_open()
                target = max(self._next_seq, above + 1)
            head = _HWM.pack(_HWM_MAGIC, FORMAT_VERSION, 0, target, 0)[:-4]
            self._write_atomic(HWM_NAME, head + struct.pack("<I", zlib.crc32(head)))
            self._hwm_durable = target

    def _quarantine_file(self, path: Path, seq: int | None, reason: str) -> bool:
        """Move ``path`` to quarantine/ (never deleted). Returns False if the file was already gone."""
        if seq is not None:
            self._ensure_hwm(seq)
        self._qdir.mkdir(exist_ok=True)
        dest = self._qdir / path.name
        n = 0
        while dest.exists():
            n += 1
            dest = self._qdir / f"{path.name}.{n}"
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return False
        if self._fsync:
            qfd = os.open(self._qdir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(qfd)
            finally:
                os.close(qfd)
        self._fsync_dir()
        with self._lock:
            self._quarantined += 1
        log.warning("spool %s: quarantined %s -> %s: %s", self.directory, path.name, dest, reason)
        if self._on_quarantine is not None:
            try:
                self._on_quarantine(dest)
            except Exception:
                log.exception("spool %s: on_quarantine hook failed", self.directory)
        return True

    def _refuse(self, record_bytes: int | None) -> SpoolFullError:
        # called with self._lock held
        what = f"a {record_bytes}-byte record" if record_bytes is not None else "a record"
        return SpoolFullError(
            f"spool {self.directory} is full, {what} was refused: {len(self._index)}/{self.max_records} records, "
            f"{self._bytes}/{self.max_bytes} bytes (learner unreachable or slower than the robot?)",
            records=len(self._index),
            bytes_=self._bytes,
            max_records=self.max_records,
            max_bytes=self.max_bytes,
            record_bytes=record_bytes,
        )

    # ------------------------------------------------------------------ append

    def allocate_and_append(self, make_payload: Callable[[int], bytes]) -> int:
        """Allocate the next sequence number, build the record with ``make_payload(seq)``, store it.

        Returns the sequence number once the record is durable on disk. Raises ``SpoolFullError``
        (consuming no sequence number) when the record would exceed ``max_records`` or ``max_bytes``.
        If ``make_payload`` raises, nothing is stored and no sequence number is consumed.
        """
        return self._append(None, make_payload)

    def append(self, seq: int, payload: bytes) -> int:
        """Store ``payload`` under an explicit ``seq`` (tests, tools); it must be >= ``next_sequence``."""
        return self._append(int(seq), lambda _s: payload)

    def _append(self, seq: int | None, make_payload: Callable[[int], bytes]) -> int:
        with self._append_lock:
            with self._lock:
                self._check_open()
                if seq is None:
                    seq = self._next_seq
                elif seq < self._next_seq:
                    raise ValueError(
                        f"sequence {seq} is below the next sequence {self._next_seq}: "
                        "sequence numbers are strictly increasing and never reused"
                    )
                if seq > _MAX_SEQ:
                    raise OverflowError(f"sequence {seq} exceeds int64")
                if len(self._index) >= self.max_records:
                    raise self._refuse(None)
            payload = make_payload(seq)
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
            payload = bytes(payload)
            size = HEADER_SIZE + len(payload)
            with self._lock:
                self._check_open()
                # only appends add records and they are serialised: counts can only have dropped
                if self._bytes + size > self.max_bytes:
                    raise self._refuse(size)
            wall = _wall_clock()
            try:
                self._write_atomic(_record_name(seq), _encode(seq, payload, wall))
            except BaseException:
                # the caller is told the record was not stored: take back a file that did reach its
                # final name (the directory fsync failed), and never hand this number out again
                with self._lock:
                    self._next_seq = max(self._next_seq, seq + 1)
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / _record_name(seq))
                raise
            with self._lock:
                self._index[seq] = (size, _monotonic())
                self._order.append(seq)
                self._bytes += size
                self._next_seq = max(self._next_seq, seq + 1)
            return seq

    def advance_sequence(self, next_sequence: int) -> int:
        """Raise the next sequence number to at least ``next_sequence`` (e.g. the learner's view after
        a lost spool directory) and make it durable. Returns the next sequence number."""
        with self._append_lock:
            with self._lock:
                self._check_open()
                self._next_seq = max(self._next_seq, int(next_sequence))
                target = self._next_seq
            self._ensure_hwm(target - 1)
            return target

    # ------------------------------------------------------------------ read / ack

    def pending(self, after: int | None = None, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Unacked records with sequence > ``after``, in sequence order, at most ``limit`` of them.

        Records acked while this call reads are skipped; a record that fails its checks is quarantined
        and skipped (with a warning).
        """
        if limit is not None and limit <= 0:
            return []
        out: list[tuple[int, bytes]] = []
        cursor = after
        while limit is None or len(out) < limit:
            want = None if limit is None else limit - len(out)
            with self._lock:
                self._check_open()
                start = self._head if cursor is None else max(self._head, bisect.bisect_right(self._order, cursor))
                batch: list[int] = []
                for i in range(start, len(self._order)):
                    s = self._order[i]
                    if s in self._index:
                        batch.append(s)
                        if want is not None and len(batch) >= want:
                            break
            if not batch:
                break
            for s in batch:
                rec = self._read(s)
                if rec is not None:
                    out.append((s, rec))
            cursor = batch[-1]
        return out

    def get(self, seq: int) -> bytes | None:
        """The payload of one unacked record, or None."""
        with self._lock:
            self._check_open()
            if seq not in self._index:
                return None
        return self._read(seq)

    def _read(self, seq: int) -> bytes | None:
        path = self.directory / _record_name(seq)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None  # acked meanwhile
        try:
            payload, _ = _decode(data, seq)
            return payload
        except _CorruptError as e:
            with self._lock:
                meta = self._index.pop(seq, None)
                if meta is None:
                    return None  # acked meanwhile
                self._bytes -= meta[0]
                self._compact_locked()
            self._quarantine_file(path, seq, f"at read: {e}")
            return None

    def ack(self, seq: int) -> bool:
        """Delete an acked record. Idempotent: False if ``seq`` is not (or no longer) in the spool."""
        return self.ack_many((seq,)) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete several acked records (one high-water-mark write at most). Returns how many were present."""
        removed: list[int] = []
        with self._lock:
            self._check_open()
            for s in seqs:
                meta = self._index.pop(s, None)
                if meta is not None:
                    self._bytes -= meta[0]
                    removed.append(s)
            if removed:
                self._compact_locked()
            # a durable newer record still bounds the numbers from above; otherwise the high-water
            # mark must be durable before the newest record disappears (its own ack will see to that)
            newer_kept = (
                bool(self._order) and self._order[-1] in self._index and self._order[-1] > max(removed, default=-1)
            )
        if not removed:
            return 0
        if not newer_kept:
            self._ensure_hwm(max(removed))
        for s in removed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / _record_name(s))
        # no directory fsync: an unlink lost in a power cut only means the record is sent again,
        # and the learner acks duplicates idempotently
        return len(removed)

    def ack_upto(self, seq: int) -> int:
        """Ack every record with sequence <= ``seq``. Returns how many were deleted."""
        with self._lock:
            self._check_open()
            end = bisect.bisect_right(self._order, seq)
            seqs = [s for s in self._order[self._head : end] if s in self._index]
        return self.ack_many(seqs)

    def _compact_locked(self) -> None:
        order, index = self._order, self._index
        while self._head < len(order) and order[self._head] not in index:
            self._head += 1
        dead = len(order) - len(index)
        if self._head == len(order):
            order.clear()
            self._head = 0
        elif dead > 1024 and dead > len(index):
            self._order = [s for s in order[self._head :] if s in index]
            self._head = 0

    # ------------------------------------------------------------------ stats / lifecycle

    @property
    def next_sequence(self) -> int:
        with self._lock:
            return self._next_seq

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def stats(self) -> dict:
        """records, bytes (whole files), oldest_age_s (0 when empty), quarantined (files in quarantine/),
        next_sequence. O(1) amortised."""
        with self._lock:
            self._compact_locked()
            if self._index:
                _, mono = self._index[self._order[self._head]]
                age = max(0.0, _monotonic() - mono)
            else:
                age = 0.0
            return {
                "records": len(self._index),
                "bytes": self._bytes,
                "oldest_age_s": age,
                "quarantined": self._quarantined,
                "next_sequence": self._next_seq,
            }

    def _release_fds(self) -> None:
        for attr in ("_dir_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the lock fd releases the flock

    def close(self) -> None:
        """Release the directory. Idempotent; the spool refuses further use."""
        with self._append_lock, self._lock:
            if self._closed:
                return
            self._closed = True
        with self._hwm_lock:
            self._release_fds()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort
        try:
            if not self._closed:
                self._release_fds()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r}, records={len(self._index)}, next_sequence={self._next_seq})"
