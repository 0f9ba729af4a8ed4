"""Key → row, and how a file-backed store keeps it crash-safe.

Files of the store's folder (besides the data chunks, packed.py):
- `journal.log`: one framed record per put/delete since the last flush, appended with a single
  write(2): [u32 length][u32 crc32][op u8][row i64][key]. A put writes its row first and its
  journal record second, so a process killed at any point leaves either the old state or the new one:
  a row without a record is unreachable (its row number is handed out again), and a record cut short
  fails its length or crc and ends the replay (the tail is cut off when the store is next opened).
- `index.npz`: the whole map at the last flush (int keys, str keys as one utf-8 blob + offsets, their
  rows, the next free row), written to a temporary name, fsynced and renamed over the old one; then
  the journal is emptied. A crash between the two replays a journal whose records the snapshot
  already holds; replaying puts and deletes in order onto their own final state gives that state
  again, so this is harmless.
Durability: against a killed process, every completed put (the page cache keeps both writes);
against power loss, what flush() fsynced.
In memory the map is a RowMap (rowmap.py): the snapshot's arrays plus the changes since.
Keys: str, or int in the int64 range (bool is refused: True == 1 would alias key 1).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .rowmap import RowMap

JOURNAL = "journal.log"
SNAPSHOT = "index.npz"
_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<Bq")
PUT, DELETE = 1, 2
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def check_key(key) -> None:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"an adapter key must be a str or an int, got {type(key).__name__} {key!r}")
    if isinstance(key, int) and not _INT_MIN <= key <= _INT_MAX:
        raise ValueError(f"an int adapter key must fit in int64, got {key}")


def _encode_key(key) -> bytes:
    return b"\x00" + struct.pack("<q", key) if isinstance(key, int) else b"\x01" + key.encode("utf-8")


def _decode_key(b: bytes):
    return struct.unpack("<q", b[1:9])[0] if b[0] == 0 else b[1:].decode("utf-8")


def frame(op: int, row: int, key) -> bytes:
    payload = _HEAD.pack(op, row) + _encode_key(key)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


class KeyIndex:
    """key → row in a dict, plus the next row to hand out; journaled when `folder` is given."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.rows = RowMap()
        self.next_row = 0
        self._journal_fd = None

    # ---- persistence
    def load(self) -> None:
        """Snapshot, then the journal's complete records; cuts a torn tail off the journal."""
        snap = self.folder / SNAPSHOT
        if snap.exists():
            with np.load(snap) as z:
                self.next_row = int(z["next_row"])
                blob, offs, srows = z["str_blob"].tobytes(), z["str_offsets"].tolist(), z["str_rows"].tolist()
                strs = {blob[offs[j]:offs[j + 1]].decode("utf-8"): row for j, row in enumerate(srows)}
                self.rows = RowMap(z["int_keys"], z["int_rows"], strs)
        path = self.folder / JOURNAL
        data = path.read_bytes() if path.exists() else b""
        pos = 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            payload = data[pos + _FRAME.size: pos + _FRAME.size + length]
            if length < _HEAD.size + 1 or len(payload) != length or zlib.crc32(payload) != crc:
                break
            op, row = _HEAD.unpack_from(payload)
            key = _decode_key(payload[_HEAD.size:])
            if op == PUT:
                self.rows[key] = row
                self.next_row = max(self.next_row, row + 1)
            elif op == DELETE:
                self.rows.pop(key, None)
            else:
                break
            pos += _FRAME.size + length
        self._journal_fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(self._journal_fd, pos)  # a torn tail must not precede the next record
        os.lseek(self._journal_fd, pos, os.SEEK_SET)

    def create(self) -> None:
        self._journal_fd = os.open(self.folder / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def _append(self, data: bytes) -> None:
        if self._journal_fd is not None:
            view = memoryview(data)
            while view:  # a regular file takes the whole write; the loop is for the rule, not the case
                n = os.write(self._journal_fd, view)
                view = view[n:]

    # ---- the map
    def allocate(self, n: int = 1) -> int:
        start = self.next_row
        self.next_row += n
        return start

    def set(self, key, row: int) -> None:
        self._append(frame(PUT, row, key))
        self.rows[key] = row

    def set_many(self, keys: list, start: int) -> None:
        """New keys (the caller checked) at rows start, start + 1, …"""
        if self._journal_fd is not None:
            self._append(b"".join(frame(PUT, start + j, k) for j, k in enumerate(keys)))
        self.rows.add_new(keys, start)

    def delete(self, key) -> None:
        self._append(frame(DELETE, -1, key))
        del self.rows[key]

    def snapshot(self) -> None:
        """Write the whole map durably and empty the journal (the caller synced the rows first)."""
        if self.folder is None:
            return
        int_keys, int_rows = self.rows.int_items()
        strs = [(k.encode("utf-8"), r) for k, r in self.rows.str_items()]
        offsets = np.zeros(len(strs) + 1, dtype=np.int64)
        if strs:
            offsets[1:] = np.cumsum([len(b) for b, _ in strs])
        tmp = self.folder / (SNAPSHOT + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, next_row=np.int64(self.next_row),
                     int_keys=int_keys, int_rows=int_rows,
                     str_blob=np.frombuffer(b"".join(b for b, _ in strs), dtype=np.uint8),
                     str_offsets=offsets, str_rows=np.array([r for _, r in strs], dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / SNAPSHOT)
        fsync_dir(self.folder)
        os.ftruncate(self._journal_fd, 0)
        os.lseek(self._journal_fd, 0, os.SEEK_SET)
        os.fsync(self._journal_fd)

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
