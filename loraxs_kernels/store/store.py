"""AdapterStore: many adapters on the host (or on disk) behind a model's few device slots.

    store = AdapterStore(model, path="users.lxs")   # path=None: host memory only
    store.put("alice", {layer path: R (r, r)})      # or a save_adapter folder
    with store.use(["alice", None, "bob"]):         # one key per row (None: the base model)
        out = model(**batch)

Where things are: layout.py (an adapter as one flat row), packed.py (the packed host arrays and
their files), index.py (key → row, the journal and the crash rules), slots.py (the LRU over the
device slots), training.py (use(..., train=True)).

Threads: every method takes the store's lock, so puts, gets and deletes from several threads are
safe. A `use` block sets ids on the model's layers, which belong to the model, not to a thread, so
two blocks cannot run at once on one model: a second `use` while one is open (from any thread) is
refused with a RuntimeError naming the thread that holds it. A store owns its model's slots; a
newer store on the same model takes them over (the older one writes its trained slots back first
and refuses further `use`). A file-backed store holds an exclusive lock on its folder (fcntl), so a
second store on the same folder, in this process or another, is refused until close().
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from ..modules.multi import read_adapter_slot
from .index import KeyIndex, check_key, fsync_dir
from .layout import STORAGE_DTYPES, RecordLayout, bank_layers
from .packed import PackedRows
from .slots import SlotCache
from .training import TrainBatch

FORMAT = "loraxs-adapter-store"
FORMAT_VERSION = 1
META = "meta.json"
LOCK = "lock"
DEFAULT_CHUNK_ROWS = 16384  # MiniLM q/v rank 8 in fp32: 48 MiB a chunk, 61 chunks for 10⁶ adapters

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


class AdapterStore:
    """Adapters by key (str or int): {bank layer path: R (r, r)} for every MultiLoRAXSLinear of
    `model`, kept in packed host arrays (dtype: fp32 by default, bf16/fp16 on request), optionally
    backed by the folder `path` (created; an existing store there is refused: AdapterStore.open)."""

    def __init__(self, model: nn.Module, path=None, *, dtype: torch.dtype = torch.float32,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, _open: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"AdapterStore needs an nn.Module, got {type(model).__name__}")
        if dtype not in STORAGE_DTYPES.values():
            raise TypeError(f"AdapterStore dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
        layers = bank_layers(model)
        self.model = model
        self.layout = RecordLayout(layers)
        self.folder = None if path is None else Path(path)
        self._lock = threading.RLock()
        self._use_owner: str | None = None
        self._lock_fd = None
        if self.folder is not None:
            meta = self._open_folder(dtype, chunk_rows, _open)
            dtype, chunk_rows = STORAGE_DTYPES[meta["dtype"]], meta["chunk_rows"]
        self.dtype, self.chunk_rows = dtype, chunk_rows
        self.rows = PackedRows(self.layout.width, dtype, chunk_rows, self.folder)
        self.index = KeyIndex(self.folder)
        if self.folder is not None:
            self.index.load() if _open else self.index.create()
        self.slots = SlotCache(layers, self.layout)
        self.cold_load_s = 0.0
        self._closed = False
        self._take_over_slots()

    @classmethod
    def open(cls, model: nn.Module, path) -> "AdapterStore":
        """The file-backed store at `path`, with the adapters of its last completed put or flush.
        Maps nothing and reads no adapter: only the index (snapshot + journal)."""
        return cls(model, path, _open=True)

    # ------------------------------------------------------------------ folder
    def _open_folder(self, dtype, chunk_rows, existing: bool) -> dict:
        folder = self.folder
        if existing:
            if not (folder / META).is_file():
                raise FileNotFoundError(f"no adapter store at {str(folder)!r} (no {META}); AdapterStore(model, path) "
                                        "creates one")
        else:
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise FileExistsError(f"{str(folder)!r} exists and is not an empty folder; AdapterStore.open(model, "
                                      "path) reopens a store, a new one needs a new path")
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"the adapter store at {str(folder)!r} is open in another AdapterStore (this process "
                               "or another); close() it first") from None
        if existing:
            meta = json.loads((folder / META).read_text())
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                self._release_folder()
                raise ValueError(f"{folder / META}: not a {FORMAT} version {FORMAT_VERSION} store")
            diff = self.layout.mismatch(meta["layers"])
            if diff is not None:
                self._release_folder()
                raise ValueError(f"the store at {str(folder)!r} was made for other bank layers: {diff}")
            return meta
        name = next(k for k, v in STORAGE_DTYPES.items() if v == dtype)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": name, "chunk_rows": chunk_rows,
                "layers": self.layout.describe()}
        tmp = folder / (META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / META)
        fsync_dir(folder)
        return meta

    def _release_folder(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _take_over_slots(self) -> None:
        old = _OWNERS.get(self.model)
        old = old() if old is not None else None
        if old is not None and old is not self:
            old._give_up_slots()
        _OWNERS[self.model] = weakref.ref(self)
        for _, layer in bank_layers(self.model):
            layer.lora_R.requires_grad_(False)  # the banks are a cache now: training goes through use(train=True)

    def _give_up_slots(self) -> None:
        with self._lock:
            if self._use_owner is not None:
                raise RuntimeError("a new AdapterStore cannot take this model's slots while a use block of the old "
                                   f"one is open (thread {self._use_owner})")
            self._write_back_dirty()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AdapterStore was closed, or a newer AdapterStore took over its model's slots")

    # ------------------------------------------------------------------ adapters
    def _record(self, adapter) -> torch.Tensor:
        if isinstance(adapter, (str, os.PathLike)):
            adapter = self._read_folder(adapter)
        return self.layout.pack(adapter, self.dtype)

    def _read_folder(self, path) -> dict:
        """A save_adapter folder's R per bank layer, in this bank's basis: loaded by load_adapter's own
        slot path (every check it makes: fingerprint, basis, signs, scaling) into a scratch slot, which
        is restored afterwards."""
        slot = self.slots.free[-1] if self.slots.free else next(
            (s for k, s in self.slots.lru.items() if k not in self.slots.active), None)
        if slot is None:
            raise RuntimeError("every slot is held by the running use block; put a folder outside the block")
        from ..adapters.slots import load_adapter_slot
        saved = self.slots.read(slot)
        try:
            load_adapter_slot(self.model, path, slot)
            return read_adapter_slot(self.model, slot)
        finally:
            self.slots.write(slot, saved)

    def _write(self, key, record: torch.Tensor) -> None:
        """record (width,) becomes key's adapter. File-backed: always a new row, then the journal
        record (so a crash leaves the old adapter or the new one); in memory: a known key in place."""
        if self.folder is None and key in self.index.rows:
            self.rows.write(self.index.rows[key], record)
            return
        row = self.index.allocate()
        self.rows.write(row, record)
        self.index.set(key, row)

    def put(self, key, adapter) -> None:
        """Store `adapter` under `key` (replacing any): {layer path: (r, r) tensor} for every bank layer
        of the model, or a save_adapter folder. Checked whole first: a mismatch is refused naming the
        first offending layer, and the store is unchanged. A key resident in a slot gets the new R there."""
        check_key(key)
        with self._lock:  # a folder is read through a scratch slot: no use() may place adapters meanwhile
            self._check_open()
            record = self._record(adapter)
            if key in self.slots.active:
                raise RuntimeError(f"adapter {key!r} is in the running use block; put it after the block")
            self._write(key, record)
            slot = self.slots.lru.get(key)
            if slot is not None:
                self.slots.write(slot, record)
                self.slots.dirty.discard(key)

    def put_many(self, keys: list, adapters: dict) -> None:
        """Many adapters at once from packed tensors {layer path: (k, r, r)}, row j for keys[j]
        (new keys only, distinct): one copy per chunk and one journal write, for building big stores."""
        keys = list(keys)
        for k in keys:
            check_key(k)
        records = self.layout.pack_many(adapters, self.dtype)
        if records.shape[0] != len(keys):
            raise ValueError(f"put_many: {len(keys)} keys for {records.shape[0]} adapters")
        with self._lock:
            self._check_open()
            known = next((k for k in keys if k in self.index.rows), None)
            if known is not None or len(set(keys)) != len(keys):
                raise ValueError(f"put_many takes new, distinct keys; {known!r} is already stored" if known is not None
                                 else "put_many: the keys repeat")
            start = self.index.allocate(len(keys))
            self.rows.write_many(start, records)
            self.index.set_many(keys, start)

    def get(self, key) -> dict[str, torch.Tensor]:
        """{layer path: R (r, r)} in the store's dtype (a trained slot's newest values)."""
        check_key(key)
        with self._lock:
            slot = self.slots.lru.get(key)
            if slot is not None and key in self.slots.dirty:
                return self.layout.unpack(self.slots.read(slot).to(self.dtype))
            if key not in self.index.rows:
                raise KeyError(f"no adapter stored under {key!r}")
            return self.layout.unpack(self.rows.read(self.index.rows[key]))

    def delete(self, key) -> None:
        check_key(key)
        with self._lock:
            self._check_open()
            if key not in self.index.rows:
                raise KeyError(f"no adapter stored under {key!r}")
            if key in self.slots.active:
                raise RuntimeError(f"adapter {key!r} is in the running use block; delete it after the block")
            self.index.delete(key)
            self.slots.drop(key)

    def __len__(self) -> int:
        return len(self.index.rows)

    def __contains__(self, key) -> bool:
        return key in self.index.rows

    # ------------------------------------------------------------------ slots
    def _gather_rows(self, keys):
        missing = next((k for k in keys if k not in self.index.rows), None)
        if missing is not None:
            raise KeyError(f"no adapter stored under {missing!r}")
        rows = [self.index.rows[k] for k in keys]
        return lambda out: self.rows.gather(rows, out)

    def _write_back(self, key, record: torch.Tensor) -> None:
        if key in self.index.rows:  # deleted meanwhile: nothing to keep
            self._write(key, record.to(self.dtype))

    def _place(self, keys: list, strict: bool):
        t0 = time.perf_counter()
        misses_before = self.slots.misses
        for k in keys:
            if k not in self.index.rows:
                raise KeyError(f"no adapter stored under {k!r} (a key of the batch); None rows use the base model")
        slots, _ = self.slots.place(keys, self._gather_rows, self._write_back, strict=strict)
        if self.slots.misses > misses_before:
            self.cold_load_s += time.perf_counter() - t0
        return slots

    def prefetch(self, keys) -> None:
        """Load these keys into slots now, ahead of the batch that names them (on CUDA the copy runs on
        a side stream, overlapping the running batch). A hint: keys of the running batch and pinned
        keys are not evicted for it, and what does not fit is left out."""
        distinct, _ = _flatten_keys(keys)
        with self._lock:
            self._check_open()
            self._place(distinct, strict=False)

    def pin(self, key) -> None:
        """Load `key` into a slot and keep it there (never evicted) until unpin(key)."""
        check_key(key)
        with self._lock:
            self._check_open()
            if key not in self.slots.pinned and len(self.slots.pinned) + 1 >= self.slots.n_slots:
                raise ValueError(f"pinning {key!r} would leave no free slot: {len(self.slots.pinned)} of "
                                 f"{self.slots.n_slots} slots are pinned already")
            self._place([key], strict=True)
            self.slots.pinned.add(key)

    def unpin(self, key) -> None:
        with self._lock:
            self.slots.pinned.discard(key)

    @contextlib.contextmanager
    def use(self, keys, train: bool = False):
        """Run the model on a batch whose row i uses adapter keys[i] (a list: one key per sequence;
        a nested list (batch, seq): one per token; None: the base model). Misses are loaded into slots
        (LRU); the batch's keys are not evicted while the block runs. Yields the ids tensor, or with
        train=True a TrainBatch whose parameters() are the only tensors that get gradients."""
        distinct, shape = _flatten_keys(keys)
        with self._lock:
            self._check_open()
            if self._use_owner is not None:
                raise RuntimeError(f"a use block of this AdapterStore is already open (thread {self._use_owner}): "
                                   "blocks set the model's adapter ids, so one runs at a time; serve the other "
                                   "batch after it, or give each thread its own model and store")
            slots = self._place(distinct, strict=True)
            self._use_owner = threading.current_thread().name
            self.slots.active = set(distinct)
        slot_of = dict(zip(distinct, slots))
        position = {k: j for j, k in enumerate(distinct)} if train else slot_of
        ids = _ids(keys, shape, position).to(self.slots.device)
        batch = None
        try:
            if train:
                batch = TrainBatch(distinct, slots, ids, self.layout.paths, self.slots.layers)
                batch.swap_in()
            self.slots.before_compute()
            with _ids_on(self.slots.layers, ids):
                yield batch if train else ids
        finally:
            with self._lock:
                if batch is not None:
                    batch.swap_out()
                    self.slots.dirty.update(distinct)
                self.slots.after_compute()
                self.slots.active = set()
                self._use_owner = None

    # ------------------------------------------------------------------ durability, stats
    def _write_back_dirty(self) -> None:
        for key in list(self.slots.dirty):
            self._write_back(key, self.slots.read(self.slots.lru[key]))
            self.slots.write_backs += 1
        self.slots.dirty.clear()

    def flush(self) -> None:
        """Trained slots back into the store; for a file-backed store, every row and the index made
        durable (fsync), the journal folded into the snapshot."""
        with self._lock:
            self._check_open()
            self._write_back_dirty()
            if self.folder is not None:
                self.rows.sync()
                self.index.snapshot()

    def close(self) -> None:
        """flush() and release the folder and the model's slots."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            self.index.close()
            self.rows.close()
            self._release_folder()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stats(self) -> dict:
        s = self.slots
        return {"adapters": len(self.index.rows), "slots": s.n_slots, "resident": len(s.lru), "pinned": len(s.pinned),
                "hits": s.hits, "misses": s.misses, "evictions": s.evictions, "write_backs": s.write_backs,
                "bytes": self.rows.nbytes(), "bytes_per_adapter_row": self.rows.row_bytes,
                "rows_used": self.index.next_row, "dtype": str(self.dtype).replace("torch.", ""),
                "file_backed": self.folder is not None, "cold_load_s": self.cold_load_s}


def _flatten_keys(keys) -> tuple[list, tuple]:
    """(distinct non-None keys in first-seen order, (batch,) or (batch, seq))."""
    if not isinstance(keys, (list, tuple)):
        raise TypeError(f"keys must be a list (one per row) or a nested list (batch, seq), got {type(keys).__name__}")
    nested = [isinstance(k, (list, tuple)) for k in keys]
    if any(nested) and not all(nested):
        raise ValueError("keys mixes lists and single keys: give one key per row, or one list per row (per token)")
    flat = [k for row in keys for k in row] if keys and all(nested) else list(keys)
    if keys and all(nested):
        lengths = {len(row) for row in keys}
        if len(lengths) != 1:
            raise ValueError(f"per-token keys must have one length per row, got lengths {sorted(lengths)}")
        shape = (len(keys), lengths.pop())
    else:
        shape = (len(keys),)
    seen = {}
    for k in flat:
        if k is not None:
            check_key(k)
            seen.setdefault(k, None)
    return list(seen), shape


@contextlib.contextmanager
def _ids_on(layers, ids: torch.Tensor):
    """use_adapters(model, ids) for the store's own layers, found once at construction: use_adapters
    walks the whole module tree and reduces the ids once per layer on every call (1.2 ms of the
    store's 2.7 ms per MiniLM batch, cProfile), and the store's ids are slot numbers, in range by
    construction. The same attribute, the same save and restore of the outer ids."""
    previous = [layer.active_adapter_ids for layer in layers]
    for layer in layers:
        layer.active_adapter_ids = ids
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer.active_adapter_ids = old


def _ids(keys, shape, position: dict) -> torch.Tensor:
    if len(shape) == 1:
        return torch.tensor([-1 if k is None else position[k] for k in keys], dtype=torch.long)
    return torch.tensor([[-1 if k is None else position[k] for k in row] for row in keys],
                        dtype=torch.long).reshape(shape)
