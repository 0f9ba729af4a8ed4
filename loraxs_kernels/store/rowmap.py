"""key → row as the reopened snapshot's sorted arrays plus a dict of the changes since.

A dict of 10⁷ int keys costs about 1 GB and seconds to build from the snapshot (one Python int and one
hash entry per key); the snapshot's int keys are kept instead as a sorted int64 array (80 MB) and
looked up by binary search (a few µs, a handful per batch), so a reopen reads two arrays and builds
nothing per adapter. Str keys, and every put or delete after the load, go to dicts."""

from __future__ import annotations

import numpy as np


class RowMap:
    def __init__(self, int_keys=None, int_rows=None, str_rows: dict | None = None):
        order = np.argsort(int_keys, kind="stable") if int_keys is not None and len(int_keys) else None
        self._ikeys = np.asarray(int_keys, dtype=np.int64)[order] if order is not None else np.zeros(0, np.int64)
        self._irows = np.asarray(int_rows, dtype=np.int64)[order] if order is not None else np.zeros(0, np.int64)
        self._base_str = dict(str_rows or {})
        self._over: dict = {}   # puts since the load (overrides the base)
        self._gone: set = set()  # base keys deleted since the load
        self._len = len(self._ikeys) + len(self._base_str)

    def _base(self, key):
        """The snapshot's row of key, or None."""
        if type(key) is int:
            i = int(np.searchsorted(self._ikeys, key))
            if i < len(self._ikeys) and int(self._ikeys[i]) == key:
                return int(self._irows[i])
            return None
        if type(key) is str:
            return self._base_str.get(key)
        return None

    def get(self, key, default=None):
        if type(key) is not int and type(key) is not str:  # 1.0 and True hash as 1: not keys here
            return default
        row = self._over.get(key)
        if row is not None:
            return row
        if key in self._gone:
            return default
        row = self._base(key)
        return default if row is None else row

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __getitem__(self, key) -> int:
        row = self.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def __setitem__(self, key, row: int) -> None:
        if key not in self:
            self._len += 1
        self._over[key] = row
        self._gone.discard(key)

    def add_new(self, keys: list, start: int) -> None:
        """keys[j] → start + j, for keys the caller checked are not present."""
        self._over.update(zip(keys, range(start, start + len(keys))))
        self._gone.difference_update(keys)
        self._len += len(keys)

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        self._over.pop(key, None)
        if self._base(key) is not None:
            self._gone.add(key)
        self._len -= 1

    def pop(self, key, default=None):
        row = self.get(key)
        if row is None:
            return default
        del self[key]
        return row

    def __len__(self) -> int:
        return self._len

    def int_items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of every int key, as arrays."""
        keep = np.ones(len(self._ikeys), dtype=bool)
        shadowed = [k for k in (*self._over, *self._gone) if type(k) is int]
        if shadowed and len(self._ikeys):
            keep &= ~np.isin(self._ikeys, np.array(shadowed, dtype=np.int64))
        over = [(k, r) for k, r in self._over.items() if type(k) is int]
        keys = np.concatenate([self._ikeys[keep], np.array([k for k, _ in over], dtype=np.int64)])
        rows = np.concatenate([self._irows[keep], np.array([r for _, r in over], dtype=np.int64)])
        return keys, rows

    def str_items(self) -> list[tuple[str, int]]:
        items = {k: r for k, r in self._base_str.items() if k not in self._gone}
        items.update((k, r) for k, r in self._over.items() if type(k) is str)
        return list(items.items())
