"""Train LoRA-XS adapters on several processes: DDP, FSDP2 or tensor parallelism, one script for the
CPU (gloo) and GPUs (nccl, one GPU per process).

    torchrun --nproc_per_node=2 -m loraxs_kernels.examples.train_distributed                  # FSDP2
    torchrun --nproc_per_node=2 -m loraxs_kernels.examples.train_distributed --strategy ddp
    torchrun --nproc_per_node=2 -m loraxs_kernels.examples.train_distributed --strategy tp
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \
        -m loraxs_kernels.examples.train_distributed                                          # 2 machines

A stack of MLP blocks (nn.Linear up, GELU, nn.Linear down, residual) gets LoRA-XS on every Linear
(apply_loraxs), then learns to imitate a teacher whose weights differ from its own by a rank-r
change inside each layer's SVD subspace, so R alone can reach it. Data-parallel strategies split each
global batch over the ranks; tensor parallelism gives every rank the whole batch and splits the
layers. It prints the loss and the bytes each step's collectives move, and rank 0 writes the adapter
file (save_adapter's format) with --out.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class Net(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build(args, device):
    from loraxs_kernels import apply_loraxs

    torch.manual_seed(0)  # same base and teacher on every rank
    student = Net(args.dim, args.hidden, args.depth).to(device)
    apply_loraxs(student, args.rank, ["up", "down"], scaling=1.0, r_init="zeros")
    teacher = Net(args.dim, args.hidden, args.depth).to(device)
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if not k.endswith(("lora_A", "lora_B", "lora_R"))},
                            strict=False)
    with torch.no_grad():  # the teacher's W: the student's W plus A R* B in each layer's own subspace
        for (_, s), (_, t) in zip(student.named_modules(), teacher.named_modules()):
            if hasattr(s, "lora_R"):
                R = torch.randn(args.rank, args.rank, device=device) * 0.3
                t.weight.add_((s.lora_A @ R @ s.lora_B).t())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def wrap(student, args, world, device):
    """The strategy; returns (model, counter or None for the DDP hook)."""
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        from loraxs_kernels.distributed import CommCounter, counting_allreduce_hook

        # broadcast_buffers=False: A and B are frozen buffers, identical on every rank from the same
        # seed; DDP's default broadcasts them at every forward ((in + out)·r numbers per layer).
        model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        counter = CommCounter()
        model.register_comm_hook(counter, counting_allreduce_hook)
        return model, counter
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    if args.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
        if args.bf16:  # FSDP2 casts parameters, not buffers: store the frozen A and B in bf16 too
            for m in student.modules():
                if hasattr(m, "lora_A"):
                    m.lora_A, m.lora_B = m.lora_A.bfloat16(), m.lora_B.bfloat16()
        for block in student.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
        fully_shard(student, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
        return student, None
    from torch.distributed.tensor.parallel import parallelize_module

    from loraxs_kernels.distributed import LoRAXSColwiseParallel, LoRAXSRowwiseParallel

    for block in student.blocks:
        parallelize_module(block, mesh, {"up": LoRAXSColwiseParallel(), "down": LoRAXSRowwiseParallel()})
    return student, None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategy", choices=["fsdp", "ddp", "tp"], default="fsdp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32, help="global batch (rows of --seq tokens)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--bf16", action="store_true", help="FSDP2: bf16 parameters, fp32 R master and reductions")
    p.add_argument("--out", default=None, help="directory for the adapter file (written by rank 0)")
    args = p.parse_args(argv)

    import loraxs_kernels.distributed as lxd

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        student, teacher = build(args, device)
        model, ddp_counter = wrap(student, args, world, device)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
        gen = torch.Generator(device=device).manual_seed(1)
        counter = lxd.CollectiveBytes()
        losses, step_bytes = [], []
        t0 = time.perf_counter()
        for step in range(args.steps):
            x = torch.randn(args.batch, args.seq, args.dim, device=device, generator=gen)
            with torch.no_grad():
                y = teacher(x)
            if args.strategy != "tp":  # data parallel: this rank's rows of the global batch
                n = args.batch // world
                x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
            counter.reset()
            if ddp_counter is not None:
                ddp_counter.reset()
            with counter:
                out = model(x)
                loss = torch.nn.functional.mse_loss(out.float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            dist.all_reduce(l := loss.detach().clone())
            losses.append(float(l) / world)
            # DDP: the hook's count (its all-reduce may also be seen by `counter` when it runs on this thread).
            step_bytes.append(ddp_counter.bytes if ddp_counter is not None else counter.total)
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {losses[-1]:.5f}  collectives {step_bytes[-1]:,} B", flush=True)
        seconds = time.perf_counter() - t0
        adapter_numel = sum(q.numel() for q in student.parameters() if q.requires_grad)
        if rank == 0:
            kinds = {"ddp_allreduce": ddp_counter.bytes} if ddp_counter else dict(counter.bytes)
            print(f"{args.strategy} on {world} processes ({'nccl' if cuda else 'gloo'}): loss {losses[0]:.5f} -> "
                  f"{losses[-1]:.5f} in {args.steps} steps, {seconds:.2f} s; trainable numbers {adapter_numel:,}; "
                  f"last step's collectives {step_bytes[-1]:,} B: {kinds}")
        path = lxd.save_adapter_sharded(model, args.out) if args.out else None
        if rank == 0 and path is not None:
            print(f"adapter written to {path}")
        return {"losses": losses, "bytes_per_step": step_bytes, "by_op": dict(counter.bytes), "world": world}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
