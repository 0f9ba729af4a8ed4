"""Training many users at once without a gradient for every slot.

A bank's backward (loraxs_linear_multi) returns a dense (n, r, r) gradient, zero for every slot no
row used. For a batch that uses k ≪ n slots, each bank is swapped for the k rows the batch uses: a
fresh leaf Parameter (k, r, r) copied from those slots, and the rows' ids renumbered 0 … k-1 to
match. The backward then makes a (k, r, r) gradient and nothing else: the slots the batch did not
use have no gradient at all (the banks themselves are frozen while the store owns them). At the end
of the block the k trained rows are copied back into their slots, which become dirty: the store
writes them back before their eviction and at flush().

Optimizer state lives for one block (see TrainBatch): a torch optimizer keyed by these fresh
Parameters cannot follow an adapter across blocks, slots or evictions, and keeping AdamW's two
moments per key would triple the store's bytes (MiniLM q/v rank 8: 3 KB → 9 KB a user, 93 GB at
10⁷ users) for users whose next batch, under a Zipf stream, comes thousands of steps later. The
default is therefore plain: build the optimizer inside the block (SGD needs no state; Adam starts
afresh each block). A caller that wants per-user moments keeps them under the user's key, from
TrainBatch.index(key) into the compact rows.
"""

from __future__ import annotations

import torch
from torch import nn


class TrainBatch:
    """What `with store.use(keys, train=True) as batch:` yields.

    batch.parameters(): one (k, r, r) Parameter per bank layer, row j = adapter batch.keys[j];
    batch.named_parameters(): (layer path, Parameter); batch.index(key) → j. Call backward and the
    optimizer step inside the block: on exit the rows are written into the slots."""

    def __init__(self, keys: list, slots: list[int], ids: torch.Tensor, paths: list[str], layers: list):
        self.keys, self.slots, self.ids = keys, slots, ids
        self._paths, self._layers = paths, layers
        self._banks = [layer.lora_R for layer in layers]
        self._compact: list[nn.Parameter] = []
        self._pos = {k: j for j, k in enumerate(keys)}

    def index(self, key) -> int:
        return self._pos[key]

    def parameters(self) -> list[nn.Parameter]:
        return list(self._compact)

    def named_parameters(self):
        return list(zip(self._paths, self._compact))

    def swap_in(self) -> None:
        idx = torch.tensor(self.slots, dtype=torch.long, device=self._banks[0].device)
        for layer, bank in zip(self._layers, self._banks):
            p = nn.Parameter(bank.detach().index_select(0, idx).clone(), requires_grad=True)
            self._compact.append(p)
            layer.lora_R = p

    @torch.no_grad()
    def swap_out(self) -> None:
        """Trained rows back into their slots; the banks back into the layers."""
        if not self._compact:
            return
        idx = torch.tensor(self.slots, dtype=torch.long, device=self._banks[0].device)
        for layer, bank, p in zip(self._layers, self._banks, self._compact):
            bank.index_copy_(0, idx, p.detach().to(bank.dtype))
            layer.lora_R = bank
