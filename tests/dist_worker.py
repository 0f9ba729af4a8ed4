"""Multi-process scenarios for test_distributed.py: one spawn of `world` processes (gloo on CPU,
127.0.0.1 only) runs every requested scenario in turn; each writes its result (or its traceback)
to a file per rank, which the tests compare against a single-process run of the same model.

The model, data, optimizer and step count are defined here once, so the single-process reference
(run in the pytest process) and the distributed runs cannot drift apart.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from loraxs_kernels import FusedLoRAXSLinear

WORLD = 2
STEPS = 3  # optimizer steps compared
BATCH, SEQ, DIM, HIDDEN, RANK = 8, 3, 16, 32, 4
LR, MOMENTUM = 0.5, 0.9
COLLECTIVE_TIMEOUT_S = 60  # gloo collectives fail after this instead of hanging


class Net(nn.Module):
    """x → up (FusedLoRAXSLinear) → GELU → down (FusedLoRAXSLinear): W, b, A, B frozen, R trains."""

    def __init__(self, checkpoint: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = FusedLoRAXSLinear(DIM, HIDDEN, RANK, scaling=2.0)
        self.down = FusedLoRAXSLinear(HIDDEN, DIM, RANK, scaling=2.0)
        with torch.no_grad():
            for layer in (self.up, self.down):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.in_features**0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
                layer.reset_adapter()
                # R far from its 1e-5 start, so the adapter path changes the output and its gradient.
                layer.lora_R.copy_(torch.randn(RANK, RANK, generator=g) * 0.3)
        self.act = nn.GELU()
        self.checkpoint = checkpoint

    def _layer(self, layer, h):
        if self.checkpoint:
            return torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
        return layer(h)

    def forward(self, x):
        return self._layer(self.down, self.act(self._layer(self.up, x)))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, SEQ, DIM, generator=g), torch.randn(BATCH, SEQ, DIM, generator=g)


def local_batch(rank: int, world: int):
    x, y = data()
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def r_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu().clone()


def train(model: nn.Module, x, y, steps: int = STEPS) -> dict:
    """`steps` SGD steps with momentum on MSE; R's gradients of every step and R afterwards, whole."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    names = r_names(model)
    params = dict(model.named_parameters())
    grads, losses = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        out = out.full_tensor() if hasattr(out, "full_tensor") else out
        loss = torch.nn.functional.mse_loss(out.float(), y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: _full(params[n].grad) for n in names})
        opt.step()
    return {"grads": grads, "R": {n: _full(params[n]) for n in names}, "losses": losses}


def reference(steps: int = STEPS, checkpoint: bool = False) -> dict:
    """The single-process run on the whole batch."""
    x, y = data()
    return train(Net(checkpoint), x, y, steps)


# ---------------------------------------------------------------------------------------- scenarios
def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def scenario_ddp(rank, world, outdir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from loraxs_kernels.distributed import CommCounter, counting_allreduce_hook

    # Base frozen: DDP buckets R only, find_unused_parameters stays False. A and B are identical
    # frozen buffers on every rank: no need to broadcast them each forward.
    model = DDP(Net(), broadcast_buffers=False)
    counter = CommCounter()
    model.register_comm_hook(counter, counting_allreduce_hook)
    x, y = local_batch(rank, world)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    res = {"grads": [], "bytes_per_step": [], "buckets_per_step": []}
    for _ in range(STEPS):
        counter.reset()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        res["grads"].append({n: _full(p.grad)
                             for n, p in model.module.named_parameters() if p.requires_grad})
        res["bytes_per_step"].append(counter.bytes)
        res["buckets_per_step"].append(counter.buckets)
        opt.step()
    res["R"] = {n: _full(p) for n, p in model.module.named_parameters() if p.requires_grad}
    res["trainable_numel"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return res


def _fsdp(model, world, per_layer=True, mp=None):
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    if per_layer:
        for layer in (model.up, model.down):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _fsdp_run(rank, world, per_layer, mp=None, checkpoint=False):
    model = _fsdp(Net(checkpoint), world, per_layer, mp)
    x, y = local_batch(rank, world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(model, x, y)
    res["warnings"] = [str(w.message) for w in caught]
    res["R_placements"] = {n: str(p.placements) for n, p in model.named_parameters() if p.requires_grad}
    return res


def scenario_fsdp_layer(rank, world, outdir):
    return _fsdp_run(rank, world, per_layer=True)


def scenario_fsdp_model(rank, world, outdir):
    return _fsdp_run(rank, world, per_layer=False)


def scenario_fsdp_checkpoint(rank, world, outdir):
    return _fsdp_run(rank, world, per_layer=True, checkpoint=True)


def scenario_fsdp_bf16(rank, world, outdir):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    res = {}
    try:  # as a user would first try it: fp32 buffers A and B beside bf16 parameters
        _fsdp_run(rank, world, per_layer=True, mp=mp)
        res["fp32_buffers_error"] = None
    except Exception as e:  # noqa: BLE001  (the message is the result)
        res["fp32_buffers_error"] = f"{type(e).__name__}: {e}"
    model = Net()
    for layer in (model.up, model.down):  # A, B frozen: stored in the compute dtype
        layer.lora_A = layer.lora_A.bfloat16()
        layer.lora_B = layer.lora_B.bfloat16()
    model = _fsdp(model, world, True, mp)
    x, y = local_batch(rank, world)
    res.update(train(model, x, y))
    res["R_dtype"] = {n: str(p.dtype) for n, p in model.named_parameters() if p.requires_grad}
    return res


def scenario_dcp(rank, world, outdir):
    import torch.distributed.checkpoint as dcp

    from loraxs_kernels.distributed import adapter_state_dict, gather_adapter, load_adapter_state_dict, save_adapter_sharded

    model = _fsdp(Net(), world)
    x, y = local_batch(rank, world)
    res = train(model, x, y)
    sd = adapter_state_dict(model)
    res["sharded_keys"] = sorted(sd)
    res["sharded_types"] = {k: type(v).__name__ for k, v in sd.items()}
    res["shard_numel"] = {k: (v.to_local() if hasattr(v, "to_local") else v).numel() for k, v in sd.items()}
    dcp.save(sd, checkpoint_id=str(Path(outdir) / "dcp"))
    fresh = _fsdp(Net(), world)
    for layer in (fresh.up, fresh.down):
        with torch.no_grad():
            layer.lora_R.to_local().zero_()
    fresh_sd = adapter_state_dict(fresh)
    dcp.load(fresh_sd, checkpoint_id=str(Path(outdir) / "dcp"))
    load_adapter_state_dict(fresh, fresh_sd)
    gathered = gather_adapter(fresh)
    res["gathered"] = None if gathered is None else {k: v.clone() for k, v in gathered.items()}
    path = save_adapter_sharded(model, Path(outdir) / "adapter")
    res["adapter_path"] = None if path is None else str(path)
    return res


def _tp_model(plan: dict, world):
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(Net(), _mesh(world), plan)


def _tp_run(plan):
    model = _tp_model(plan, WORLD)
    x, y = data()  # tensor parallelism: every rank sees the whole batch
    res = train(model, x, y)
    res["placements"] = {n: str(p.placements) for n, p in model.named_parameters()}
    res["placements"].update({n: str(b.placements) for n, b in model.named_buffers()})
    res["grad_placements"] = {n: str(p.grad.placements) for n, p in model.named_parameters() if p.requires_grad}
    return res


def scenario_tp_mlp(rank, world, outdir):
    from loraxs_kernels.distributed import LoRAXSColwiseParallel, LoRAXSRowwiseParallel

    return _tp_run({"up": LoRAXSColwiseParallel(), "down": LoRAXSRowwiseParallel()})


def scenario_tp_colwise(rank, world, outdir):
    from torch.distributed.tensor import Replicate

    from loraxs_kernels.distributed import LoRAXSColwiseParallel

    return _tp_run({"up": LoRAXSColwiseParallel(output_layouts=Replicate()),
                    "down": LoRAXSColwiseParallel(output_layouts=Replicate())})


def scenario_tp_rowwise(rank, world, outdir):
    from torch.distributed.tensor import Replicate

    from loraxs_kernels.distributed import LoRAXSRowwiseParallel

    return _tp_run({"up": LoRAXSRowwiseParallel(input_layouts=Replicate()),
                    "down": LoRAXSRowwiseParallel(input_layouts=Replicate())})


def scenario_dtensor_batch(rank, world, outdir):
    """Every tensor of the layers replicated, the batch split by rows: DTensor data parallelism."""
    from torch.distributed.tensor import DTensor, Shard, distribute_module

    mesh = _mesh(world)
    model = distribute_module(Net(), mesh)
    x, y = local_batch(rank, world)
    res = train(model, DTensor.from_local(x, mesh, [Shard(0)]), data()[1])
    res["placements"] = {n: str(p.placements) for n, p in model.named_parameters()}
    res["placements"].update({n: str(b.placements) for n, b in model.named_buffers()})
    res["grad_placements"] = {n: str(p.grad.placements) for n, p in model.named_parameters() if p.requires_grad}
    return res


def scenario_tp_unsupported(rank, world, outdir):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from loraxs_kernels.distributed import UnsupportedLayout

    mesh = _mesh(world)
    layer = Net().up
    # W split by output features but B left whole: a column-wise W without the matching B.
    place = {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_R": Replicate(), "lora_B": Replicate()}
    for name, p in place.items():
        t = distribute_tensor(getattr(layer, name).detach(), mesh, [p])
        if name in layer._parameters:
            layer.register_parameter(name, nn.Parameter(t, requires_grad=name == "lora_R"))
        else:
            layer.register_buffer(name, t)
    x = distribute_tensor(data()[0], mesh, [Replicate()])
    try:
        layer(x)
    except Exception as e:  # noqa: BLE001  DTensor re-raises the rule's UnsupportedLayout as a RuntimeError
        cause = e.__cause__
        return {"error": f"{type(e).__name__}: {e}", "cause": type(cause).__name__ if cause else None,
                "is_unsupported_layout": isinstance(cause, UnsupportedLayout)}
    return {"error": None}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


# ------------------------------------------------------------------------------------------ runner
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, names, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import loraxs_kernels.distributed  # noqa: F401  (the op's DTensor rules)

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                res = SCENARIOS[name](rank, world, outdir)
                res["seconds"] = time.perf_counter() - t0
                torch.save(res, Path(outdir) / f"{name}.rank{rank}.pt")
            except Exception:  # noqa: BLE001  (reported by the test that reads this scenario)
                (Path(outdir) / f"{name}.rank{rank}.err").write_text(traceback.format_exc())
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run(names: list[str], outdir, world: int = WORLD, timeout_s: float = 150.0) -> float:
    """Run the scenarios in `world` fresh processes; return the wall time. Kills the processes and
    raises TimeoutError when they are not done after timeout_s."""
    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    ctx = mp.start_processes(_entry, args=(world, free_port(), names, str(outdir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = t0 + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.perf_counter())):
        if time.perf_counter() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            raise TimeoutError(f"distributed scenarios {names} not done after {timeout_s:.0f} s; processes killed")
    return time.perf_counter() - t0


def load(outdir, name: str, rank: int):
    err = Path(outdir) / f"{name}.rank{rank}.err"
    if err.exists():
        raise AssertionError(f"scenario {name} failed on rank {rank}:\n{err.read_text()}")
    f = Path(outdir) / f"{name}.rank{rank}.pt"
    if not f.exists():
        raise AssertionError(f"scenario {name} left no result on rank {rank}")
    return torch.load(f, weights_only=False)


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    names = sys.argv[2:] or list(SCENARIOS)
    print(f"{run(names, out):.1f} s")
    for n in names:
        for r in range(WORLD):
            e = out / f"{n}.rank{r}.err"
            print(n, r, "ERR\n" + e.read_text() if e.exists() else "ok")
