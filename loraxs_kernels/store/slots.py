"""The device slots: an LRU map key → slot over the model's MultiLoRAXSLinear banks.

Slot s of every bank holds one adapter. A miss copies its row (all layers) into a staging buffer
and then into slot s of each bank. On the CPU that is one torch._foreach_copy_ for all the call's
misses over views made once (staging row j's piece of each layer → slot s of each bank): a cold load from RAM took
0.074 ms with one index_copy_ per layer (12 on MiniLM, their slicing and index tensors included) in
`python -m benchmarks --preset store` on this machine. On a device, one index_copy_ per layer for all
the batch's misses together (12 copies per batch, not 12 per adapter). On CUDA the staging
buffer is pinned and the copies run on a side stream, ordered after the compute that last read the
slots (an event at the end of each `use` block) and before the next compute that reads them (the
compute stream waits on the copy's event); on the CPU the same code runs without streams.
Keys of the running batch and pinned keys are never evicted; a slot trained since it was loaded
(dirty) is written back to the store before its adapter leaves it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .layout import RecordLayout


class SlotCache:
    def __init__(self, layers, layout: RecordLayout):
        counts = {m.num_adapters for _, m in layers}
        if len(counts) != 1:
            raise ValueError("AdapterStore needs every bank to hold the same number of slots, got "
                             + ", ".join(f"{p}: {m.num_adapters}" for p, m in layers))
        self.layers = [m for _, m in layers]
        self.layout = layout
        self.n_slots = counts.pop()
        self.device = self.layers[0].lora_R.device
        self.lru: OrderedDict = OrderedDict()  # key → slot, least recently used first
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.pinned: set = set()
        self.dirty: set = set()
        self.active: set = set()  # keys of the running use block
        self.hits = self.misses = self.evictions = self.write_backs = 0
        cuda = self.device.type == "cuda"
        self.staging = torch.empty(self.n_slots, layout.width, dtype=torch.float32, pin_memory=cuda)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.copy_done = None    # event: the last slot copy (compute waits on it)
        self.compute_done = None  # event: the end of the last use block (copies wait on it)
        self._views_of = None     # [(id, data_ptr, dtype)] of the banks _slot_views was made from: remade when one changes
        self._views_banks: list = []
        self._slot_views: list = []
        self._staging_views: dict[int, list] = {}

    # ---- which slot
    def place(self, keys: list, rows_of, write_back, *, strict: bool) -> tuple[list[int], int]:
        """Slots for `keys` (distinct), loading the misses; rows_of(keys) → a gather(out) that fills
        out with their rows; write_back(key, record) stores a dirty victim. strict: every key must fit
        (a batch), else as many as fit (a prefetch). Returns (slots of the keys placed, hits)."""
        misses = [k for k in keys if k not in self.lru]
        protect = set(keys) | self.active | self.pinned
        room = len(self.free) + len(self.lru) - sum(1 for k in protect if k in self.lru) if misses else 0
        if strict and len(misses) > room:
            others = len(self.pinned - set(keys))
            running = len(self.active - set(keys))
            raise ValueError(
                f"the batch names {len(keys)} distinct adapters but the model has {self.n_slots} slots"
                + (f" ({others} pinned to other keys)" if others else "")
                + (f" ({running} held by the running use block)" if running else "")
                + f"; use at most {self.n_slots - others - running} distinct keys per batch, or build more slots "
                  "(apply_loraxs(..., num_adapters=n))")
        for k in keys:
            if k in self.lru:
                self.lru.move_to_end(k)
        loads = []
        for k in misses:
            slot = self._take(protect, write_back)
            if slot is None:
                break  # prefetch: no room left
            loads.append((k, slot))
            self.lru[k] = slot
        if loads:
            self._load([s for _, s in loads], rows_of([k for k, _ in loads]))
        hits = len(keys) - len(misses)
        self.hits += hits
        self.misses += len(loads)
        return [self.lru[k] for k in keys if k in self.lru], hits

    def _take(self, protect: set, write_back) -> int | None:
        if self.free:
            return self.free.pop()
        for victim in self.lru:
            if victim not in protect:
                break
        else:
            return None
        slot = self.lru.pop(victim)
        if victim in self.dirty:
            write_back(victim, self.read(slot))
            self.dirty.discard(victim)
            self.write_backs += 1
        self.evictions += 1
        return slot

    def drop(self, key) -> None:
        """Forget key's slot (the slot becomes free); its contents are the caller's business."""
        slot = self.lru.pop(key, None)
        if slot is not None:
            self.free.append(slot)
        self.dirty.discard(key)
        self.pinned.discard(key)

    # ---- moving rows
    def _load(self, slots: list[int], gather) -> None:
        """gather(out) fills out[:len(slots)] with the rows; then one index_copy_ per bank."""
        if self.stream is not None and self.copy_done is not None:
            self.copy_done.synchronize()  # the pinned buffer is reused: its last copy must have left
        rows = gather(self.staging)
        if self.stream is None and self.device.type == "cpu":
            self._copy_into_banks_cpu(slots)
            return
        idx = torch.tensor(slots, dtype=torch.long)
        if self.stream is None:
            self._copy_into_banks(rows, idx)
            return
        with torch.cuda.stream(self.stream):
            if self.compute_done is not None:
                self.stream.wait_event(self.compute_done)
            self._copy_into_banks(rows.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))
            self.copy_done = torch.cuda.Event()
            self.copy_done.record(self.stream)

    @torch.no_grad()
    def _copy_into_banks(self, rows: torch.Tensor, idx: torch.Tensor) -> None:
        m = rows.shape[0]
        for layer, off, r in zip(self.layers, self.layout.offsets, self.layout.ranks):
            bank = layer.lora_R
            bank.index_copy_(0, idx, rows[:, off:off + r * r].reshape(m, r, r).to(bank.dtype))

    @torch.no_grad()
    def _copy_into_banks_cpu(self, slots: list[int]) -> None:
        """Staging row j → slot slots[j] of every bank: one foreach copy for all of them (the dtype
        cast included), over views made once per set of banks."""
        try:  # the parameters dict read straight: Module.__getattr__ took 8 of a cold load's 35 µs (12 layers)
            banks = [layer._parameters["lora_R"] for layer in self.layers]
        except KeyError:  # not a registered parameter (patched by someone): the attribute, whatever it is
            banks = [layer.lora_R for layer in self.layers]
        # .data = ... or .to() keep the object and change its storage. ids are safe to compare: the banks
        # the views were made from are held in _views_banks, so no new object can take their id.
        made_from = [(id(bank), bank.data_ptr(), bank.dtype) for bank in banks]
        if made_from != self._views_of:
            self._slot_views = [[bank[s] for bank in banks] for s in range(self.n_slots)]
            self._views_of, self._views_banks = made_from, banks
        dst, src = [], []
        for j, slot in enumerate(slots):
            views = self._staging_views.get(j)
            if views is None:
                views = self._staging_views[j] = [self.staging[j, off:off + r * r].view(r, r)
                                                  for off, r in zip(self.layout.offsets, self.layout.ranks)]
            dst += self._slot_views[slot]
            src += views
        torch._foreach_copy_(dst, src)  # every miss of the call, every layer: one call

    @torch.no_grad()
    def read(self, slot: int) -> torch.Tensor:
        """Slot `slot` of every bank as one fp32 row on the CPU (waits for the device)."""
        return torch.cat([layer.lora_R[slot].reshape(-1).float().cpu() for layer in self.layers])

    def write(self, slot: int, record: torch.Tensor) -> None:
        """One row into one slot (a put of a resident key)."""
        def gather(out):
            out[0].copy_(record)
            return out[:1]
        self._load([slot], gather)

    def before_compute(self) -> None:
        if self.stream is not None and self.copy_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copy_done)

    def after_compute(self) -> None:
        if self.stream is not None:
            self.compute_done = torch.cuda.Event()
            self.compute_done.record(torch.cuda.current_stream(self.device))
