"""Tensor-parallel styles for FusedLoRAXSLinear, used like torch's own with parallelize_module:

    parallelize_module(model, mesh, {"up": LoRAXSColwiseParallel(), "down": LoRAXSRowwiseParallel()})

Column-wise: W and b split by output features (Shard(0)), B by its columns (Shard(1)), A and R
replicated; the input is replicated (all-gathered if it came sharded) and the output is sharded on
its last dimension. Row-wise: W split by input features (Shard(1)), A by its rows (Shard(0)), b, R
and B replicated; the input is sharded on its last dimension and the output is all-reduced.
Which reductions follow is in sharding.py. Any other module is handed to torch's own style.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ..modules.linear import FusedLoRAXSLinear
from . import sharding  # noqa: F401  (the op's DTensor rules)


def _distribute(module: nn.Module, mesh, placements: dict, src_data_rank) -> None:
    for name, placement in placements.items():
        if name in module._parameters:
            param = module._parameters[name]
            if param is None:
                continue
            dist = distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src_data_rank)
            module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))
        else:
            buf = module._buffers[name]
            module.register_buffer(name, distribute_tensor(buf, mesh, [placement], src_data_rank=src_data_rank))


class _LoRAXSStyle:
    """What the column- and row-wise styles share: a FusedLoRAXSLinear is distributed with the
    subclass's PLACEMENTS (and INPUT_LAYOUTS, where they differ from torch's style); any other
    module goes to torch's own style."""

    PLACEMENTS: dict = {}
    INPUT_LAYOUTS: tuple | None = None

    def _partition_loraxs_fn(self, name, module, device_mesh):
        _distribute(module, device_mesh, self.PLACEMENTS, self.src_data_rank)

    def _apply(self, module: nn.Module, device_mesh):
        if not isinstance(module, FusedLoRAXSLinear):
            return super()._apply(module, device_mesh)
        if self.INPUT_LAYOUTS is not None:
            self.desired_input_layouts = self.INPUT_LAYOUTS
        return distribute_module(
            module, device_mesh, self._partition_loraxs_fn,
            lambda mod, inputs, mesh: self._prepare_input_fn(
                self.input_layouts, self.desired_input_layouts, mod, inputs, mesh),
            lambda mod, outputs, mesh: self._prepare_output_fn(
                self.output_layouts, self.use_local_output, mod, outputs, mesh),
        )


class LoRAXSColwiseParallel(_LoRAXSStyle, ColwiseParallel):
    """ColwiseParallel that also shards a FusedLoRAXSLinear's A and B (see the module docstring)."""

    PLACEMENTS = {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_R": Replicate(),
                  "lora_B": Shard(1)}


class LoRAXSRowwiseParallel(_LoRAXSStyle, RowwiseParallel):
    """RowwiseParallel that also shards a FusedLoRAXSLinear's A and B (see the module docstring)."""

    PLACEMENTS = {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(0), "lora_R": Replicate(),
                  "lora_B": Replicate()}
    INPUT_LAYOUTS = (Shard(-1),)
