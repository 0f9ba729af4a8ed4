"""What DDP communicates: a comm hook that all-reduces each gradient bucket (averaged over the ranks,
as DDP's default) and counts its bytes.

    counter = CommCounter()
    ddp.register_comm_hook(counter, counting_allreduce_hook)
"""
# No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.

import torch
import torch.distributed as dist


class CommCounter:
    """State of counting_allreduce_hook: `bytes` all-reduced and `buckets` since the last reset().
    With the base frozen, DDP buckets only parameters that require grad, so for a LoRA-XS model this
    is r² × element size per layer and per step."""

    def __init__(self, group=None):
        self.group = group
        self.reset()

    def reset(self):
        self.bytes = 0
        self.buckets = 0


def counting_allreduce_hook(state: CommCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size()
    state.buckets += 1
    buf.div_(dist.get_world_size(state.group))
    fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class CollectiveBytes:
    """Context manager counting the collectives run inside it in this thread (FSDP2's all-gathers and
    reduce-scatters, DTensor's redistributions): `bytes[op]` sums each call's full buffer (the
    all-gathered output, the reduce-scattered input, the all-reduced tensor), `calls[op]` the calls.
    Wire traffic per rank with ring algorithms is (n-1)/n of that for all-gather and reduce-scatter
    and 2(n-1)/n for all-reduce. Not seen: collectives issued inside a DTensor op's dispatch (a
    TorchDispatchMode is switched off while it runs the op), e.g. the reduction of a Partial grad_R
    (r² numbers per layer) under tensor parallelism, and DDP's bucket all-reduces when its reducer
    runs them off this thread: use counting_allreduce_hook for DDP."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ns = func.namespace
                if ns in ("c10d", "_c10d_functional"):
                    counter._count(func, args)
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    @staticmethod
    def _nbytes(a) -> int:
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size()
        if isinstance(a, (list, tuple)):
            return sum(CollectiveBytes._nbytes(t) for t in a)
        return 0

    def _count(self, func, args):
        name = func.__name__.split(".")[0]
        if not any(k in name for k in ("reduce", "gather", "scatter", "broadcast", "all_to_all", "alltoall")):
            return  # wait_tensor, barrier, _wrap_tensor_autograd: no data moved
        if func.namespace == "_c10d_functional" and name.startswith("all_gather"):
            n = self._nbytes(args[0]) * int(args[1])  # (input, group_size, group)
        elif func.namespace == "_c10d_functional":
            n = self._nbytes(args[0])
        else:  # c10d ops: (outputs, inputs, ...) or (tensors, ...); the larger side is the full buffer
            n = max(self._nbytes(args[0]), self._nbytes(args[1]) if len(args) > 1 else 0)
        self.bytes[name] = self.bytes.get(name, 0) + n
        self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self):
        self.bytes.clear()
        self.calls.clear()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
