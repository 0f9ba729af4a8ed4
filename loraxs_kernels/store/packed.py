"""Every adapter's row in a few packed host arrays, grown a chunk at a time.

A chunk is a (chunk_rows, width) array: in host memory (path=None) or a memory-mapped file
`data-NNNNNN.bin` of the store's folder, created at its full size as a sparse file so that disk
blocks are only spent on rows written, and mapped only when a row of it is first touched (reopening
a store of 10⁷ adapters maps nothing). Rows never move: a row number is an adapter's address in the
index, and the layout needs no per-adapter object (a Python tensor per adapter costs ~200 bytes of
header for 3 KB of data, and 10⁷ allocator calls)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import torch

# numpy has no bfloat16: a bf16 file is mapped as uint16 and viewed as bf16 by torch (same bytes).
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def chunk_name(i: int) -> str:
    return f"data-{i:06d}.bin"


class PackedRows:
    def __init__(self, width: int, dtype: torch.dtype, chunk_rows: int, folder: Path | None = None):
        self.width, self.dtype, self.chunk_rows, self.folder = width, dtype, chunk_rows, folder
        self.row_bytes = width * torch.empty((), dtype=dtype).element_size()
        self._chunks: dict[int, torch.Tensor] = {}
        self._maps: dict[int, np.memmap] = {}
        self._touched: set[int] = set()  # chunks written since the last sync

    # ---- chunks
    def _chunk(self, i: int, create: bool) -> torch.Tensor:
        t = self._chunks.get(i)
        if t is not None:
            return t
        if self.folder is None:
            if not create:
                raise IndexError(f"chunk {i} of the in-memory store was never written")
            t = torch.empty(self.chunk_rows, self.width, dtype=self.dtype)
        else:
            path = self.folder / chunk_name(i)
            size = self.chunk_rows * self.row_bytes
            if not path.exists():
                if not create:
                    raise FileNotFoundError(f"{path}: a chunk of the store's rows is missing")
                with open(path, "wb") as f:
                    f.truncate(size)  # sparse: blocks are allocated as rows are written
            elif path.stat().st_size != size:
                raise RuntimeError(f"{path} has {path.stat().st_size} bytes, expected {size} "
                                   f"({self.chunk_rows} rows of {self.row_bytes} bytes): not this store's chunk")
            m = np.memmap(path, dtype=_NUMPY[self.dtype], mode="r+", shape=(self.chunk_rows, self.width))
            # Rows are read one at a time in popularity order, not in file order: the kernel's readahead
            # (128 KiB and growing per fault) would read ~40 rows from disk for each 3 KB row wanted.
            if hasattr(mmap, "MADV_RANDOM") and getattr(m, "_mmap", None) is not None:
                m._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[i] = m
            t = torch.from_numpy(m)
            if self.dtype == torch.bfloat16:
                t = t.view(torch.bfloat16)
        self._chunks[i] = t
        return t

    def chunks_held(self) -> int:
        return len(self._chunks)

    def nbytes(self) -> int:
        """Host bytes of the arrays this process holds (for a file-backed store: mapped, paged on demand)."""
        return len(self._chunks) * self.chunk_rows * self.row_bytes

    # ---- rows
    def write(self, row: int, record: torch.Tensor) -> None:
        c, i = divmod(row, self.chunk_rows)
        self._chunk(c, True)[i].copy_(record)
        self._touched.add(c)

    def write_many(self, start: int, records: torch.Tensor) -> None:
        """records (k, width) into rows start … start+k-1: one slice copy per chunk crossed."""
        done = 0
        while done < records.shape[0]:
            c, i = divmod(start + done, self.chunk_rows)
            n = min(self.chunk_rows - i, records.shape[0] - done)
            self._chunk(c, True)[i:i + n].copy_(records[done:done + n])
            self._touched.add(c)
            done += n

    def read(self, row: int) -> torch.Tensor:
        c, i = divmod(row, self.chunk_rows)
        return self._chunk(c, False)[i]

    def gather(self, rows: list[int], out: torch.Tensor) -> torch.Tensor:
        """Rows into out[:len(rows)] (out: (≥ len(rows), width), any float dtype; pinned on CUDA)."""
        for j, row in enumerate(rows):
            c, i = divmod(row, self.chunk_rows)
            out[j].copy_(self._chunk(c, False)[i])
        return out[:len(rows)]

    def sync(self) -> None:
        """Make every row written so far durable (msync + fsync of the touched chunk files)."""
        if self.folder is None:
            return
        for c in sorted(self._touched):
            self._maps[c].flush()
            fd = os.open(self.folder / chunk_name(c), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._touched.clear()

    def close(self) -> None:
        self._chunks.clear()
        self._maps.clear()
