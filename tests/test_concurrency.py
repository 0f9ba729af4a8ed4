"""Concurrency (issue 19): both ops and both modules called from 8 threads at once on the CPU, 1,000
calls per thread, give bitwise the results one thread gives for the same inputs.

Runs in a fresh interpreter (a subprocess), so that the threads make the first calls of the process
together: the lazy state is initialised under contention (the Python backends' lru_caches, the
once-only warnings, the C++ function-local statics that resolve py_fwd / py_multi_fwd, the auto table
behind a shared_mutex in csrc/backend.cpp). Each thread owns its inputs (seeded by its index), so a
result leaking from one thread into another shows as a mismatch; each call is checked against the
first result of that thread and, at the end, against one thread running the same inputs alone.

The workloads: loraxs_linear with backend "cpp" (C++ end to end) and "torch" (the dispatcher calling
back into Python), loraxs_linear_multi with ids that pick each CPU schedule (per row and grouped),
FusedLoRAXSLinear and MultiLoRAXSLinear (adapter_ids passed to forward: use_adapters sets module
state and is per model, not per thread). Forward and backward (grad_x, grad_R) every call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from common import allow_no_native, native_reason

pytestmark = pytest.mark.skipif(native_reason() is not None and allow_no_native(),
                                reason=f"the C++ extension is missing: {native_reason()}")

THREADS = 8
CALLS = 1000

SCRIPT = textwrap.dedent("""
    import json, sys, threading, warnings
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import loraxs_kernels as lk

    THREADS, CALLS = int(sys.argv[1]), int(sys.argv[2])
    WORKLOADS = ["single-cpp", "single-torch", "multi-per-row", "multi-grouped", "module", "multi-module"]

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        rn = lambda *s: torch.randn(*s, generator=g)
        return dict(x=rn(6, 24), w=rn(20, 24), b=rn(20), A=rn(24, 4), R=rn(4, 4), B=rn(4, 20), bank=rn(5, 4, 4),
                    ids_row=torch.tensor([0, 1, 2, 3, 4, -1]), xg=rn(64, 24), Rg=rn(2, 16, 16),
                    Ag=rn(24, 16), Bg=rn(16, 20), ids_grp=torch.randint(0, 2, (64,), generator=g), g=rn(6, 20),
                    gg=rn(64, 20))

    def modules(seed):
        torch.manual_seed(seed)
        m = lk.FusedLoRAXSLinear(24, 20, 4, scaling=0.5)
        mm = lk.MultiLoRAXSLinear(24, 20, 4, 3, scaling=0.5)
        with torch.no_grad():
            m.lora_R.normal_()
            mm.lora_R.normal_()
        return m, mm

    def run(kind, t, mods):
        if kind in ("multi-grouped",):
            x = t["xg"].clone().requires_grad_()
            R = t["Rg"].clone().requires_grad_()
            y = lk.loraxs_linear_multi(x, t["w"], t["b"], t["Ag"], R, t["Bg"], t["ids_grp"], 0.5)
            y.backward(t["gg"])
            return [y, x.grad, R.grad]
        x = t["x"].clone().requires_grad_()
        if kind.startswith("single"):
            R = t["R"].clone().requires_grad_()
            y = lk.loraxs_linear(x, t["w"], t["b"], t["A"], R, t["B"], 0.5, backend=kind.split("-")[1])
        elif kind == "multi-per-row":
            R = t["bank"].clone().requires_grad_()
            y = lk.loraxs_linear_multi(x, t["w"], t["b"], t["A"], R, t["B"], t["ids_row"], 0.5)
        elif kind == "module":
            m = mods[0]
            m.lora_R.grad = None
            y, R = m(x), m.lora_R
        else:
            mm = mods[1]
            mm.lora_R.grad = None
            y, R = mm(x, t["ids_row"] % 3), mm.lora_R
        y.backward(t["g"])
        return [y, x.grad, R.grad]

    first, bad, errors = {}, [], []
    barrier = threading.Barrier(THREADS)

    # Built here, one after the other: module construction draws from the global RNG.
    MODS = [modules(i) for i in range(THREADS)]

    def worker(i):
        # torch's intra-op thread count is per OS thread: a new thread starts with every core, and
        # F.linear alone then gives other bits than in the main thread (measured: 2,400 of 2,400 calls
        # from 8 threads). Each worker takes the main thread's setting, as a server's workers would.
        torch.set_num_threads(1)
        t, mods = inputs(i), MODS[i]
        try:
            barrier.wait()
            for c in range(CALLS):
                kind = WORKLOADS[(c + i) % len(WORKLOADS)]
                out = [o.detach().clone() for o in run(kind, t, mods)]
                ref = first.setdefault((i, kind), out)
                if not all(torch.equal(a, b) for a, b in zip(out, ref)):
                    bad.append(f"thread {i} call {c} {kind}")
        except Exception as e:
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # One thread alone, the same inputs: the expected bits.
    alone = []
    for i in range(THREADS):
        t, mods = inputs(i), MODS[i]
        for kind in WORKLOADS:
            out = [o.detach().clone() for o in run(kind, t, mods)]
            if (i, kind) not in first or not all(torch.equal(a, b) for a, b in zip(out, first[(i, kind)])):
                alone.append(f"thread {i} {kind}")
    print(json.dumps({"calls": THREADS * CALLS, "checked": len(first), "bad": bad[:20], "n_bad": len(bad),
                      "errors": errors[:5], "alone": alone}))
""")


def run_threads(threads: int, calls: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(threads), str(calls)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_threads_give_one_threads_bits():
    out = run_threads(THREADS, CALLS)
    assert out["errors"] == [], out["errors"]
    assert out["calls"] == THREADS * CALLS and out["checked"] == THREADS * 6, out
    assert out["n_bad"] == 0, f"{out['n_bad']} calls differ from their thread's first result: {out['bad']}"
    assert out["alone"] == [], f"differ from one thread alone: {out['alone']}"
