"""Training LoRA-XS layers across processes with torch.distributed: DDP, FSDP2 and DTensor tensor
parallelism (see the README's "Training on several processes").

Imported only on demand (`import loraxs_kernels.distributed`): `import loraxs_kernels` stays free of
torch.distributed.tensor and FSDP. Importing this package registers the op's DTensor sharding rules.

- sharding.py: the rules of loraxs::linear_fwd / linear_bwd on DTensors (column-wise, row-wise,
  replicated, batch-sharded), and the error for any other layout.
- tensor_parallel.py: ColwiseParallel / RowwiseParallel styles that shard FusedLoRAXSLinear's W, b,
  A and B (R stays replicated) for parallelize_module.
- checkpoint.py: the adapter (R only) as a sharded state dict for torch.distributed.checkpoint, R
  gathered to one rank, and save_adapter from a sharded (FSDP2) model.
- comm.py: a DDP communication hook that counts the bytes all-reduced per step.
"""

from . import sharding
from .checkpoint import CollectiveFailure, adapter_state_dict, gather_adapter, load_adapter_state_dict, save_adapter_sharded
from .comm import CollectiveBytes, CommCounter, counting_allreduce_hook
from .sharding import UnsupportedLayout
from .tensor_parallel import LoRAXSColwiseParallel, LoRAXSRowwiseParallel

__all__ = [
    "CollectiveFailure",
    "LoRAXSColwiseParallel",
    "LoRAXSRowwiseParallel",
    "UnsupportedLayout",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "gather_adapter",
    "save_adapter_sharded",
    "CollectiveBytes",
    "CommCounter",
    "counting_allreduce_hook",
    "sharding",
]
