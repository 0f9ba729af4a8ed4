"""python -m benchmarks [--preset quick|full|smoke|multi|overhead|init|e2e|store] [--device auto|cpu|cuda] [--providers a,b]
                     [--modes forward,backward,full] [--dtypes bf16,fp16] [--out DIR] [--no-plots]
                     [--key-only] [--min-reps N] [--threads N] [--wait-quiet S]

Runs every available provider on every case of the preset in every mode and writes results.json,
results.md and PNG plots to benchmarks/results/<device>-<timestamp>/ (or --out). docs/benchmarks.md
says how to read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import measure, report, roofline
from .cases import DTYPES, MODES, PRESETS, Case, cases_for
from .providers import Built, Provider, make_inputs, select

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUSY_FRAC = 0.25  # other processes' CPU share above which a CPU measurement counts as disturbed
REPO_ROOT = Path(__file__).resolve().parent.parent
# Presets that measure something other than one layer's providers: each is a module of this package
# with run(device, out_dir, log, quick=False) -> list of records, which writes <name>.md (printed at the
# end) and <name>.json into out_dir.
MODEL_PRESETS = {"overhead": "overhead", "init": "init", "e2e": "e2e", "store": "store"}
DEFAULT_MODEL_PRESETS = ("e2e", "store")  # appended, small (quick=True), to the default run (make bench)


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("--preset", choices=PRESETS + tuple(MODEL_PRESETS), default="quick",
                   help="quick (default; minutes), full (every shape, M, rank and dtype), smoke (seconds), "
                        "overhead (µs per call at tiny shapes: the host's cost; benchmarks/overhead.py), "
                        "init (SVD initialisation, adapter save/load; benchmarks/init.py), "
                        "e2e (training steps of whole models against PEFT; benchmarks/e2e.py), "
                        "store (many adapters behind one model; benchmarks/store.py)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when a GPU is visible, else cpu")
    p.add_argument("--providers", help="comma-separated subset (default: all)")
    p.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    p.add_argument("--dtypes", help=f"comma-separated subset of {','.join(DTYPES)} "
                                    "(default: fp32 on CPU; bf16 on GPU, plus fp16 with --preset full)")
    p.add_argument("--out", help="output directory (default: benchmarks/results/<device>-<timestamp>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--key-only", action="store_true",
                   help="only the preset's key case (the one results.md summarises first)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's own choice). "
                                                "On a shared CPU, 1 thread avoids waiting at every op's "
                                                "parallel-region barrier for a thread another job descheduled")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each (case, mode), wait up to S seconds until other processes use less than "
                        f"{BUSY_FRAC * 100:.0f}%% of the CPUs (for a shared CPU machine; default 0: do not wait)")
    p.add_argument("--min-reps", type=int, help="at least this many timed calls per provider and mode "
                                                "(e.g. 30 for a steadier key-case ratio on a busy machine); "
                                                "with --preset e2e, at least this many interleaved rounds")
    args = p.parse_args(argv)
    for flag, values, allowed in (("--modes", _csv(args.modes), MODES), ("--dtypes", _csv(args.dtypes), DTYPES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return args


# ------------------------------------------------------------------------------------ environment
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)  # no import: importing triton or peft takes seconds
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # not on every platform
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}"


def environment(device: torch.device, preset: str, peak: roofline.Peak | None, settings: measure.Settings,
                threads_set: bool = False) -> dict:
    if device.type == "cuda":
        timing = ("CUDA events around each call after warm-up, L2 flushed (256 MiB zeroed) before each; "
                  f"providers interleaved; {settings.min_reps}-{settings.max_reps} repeats, "
                  f"about {settings.rep_s * 1e3:.0f} ms of calls per provider")
        peak_method = "torch.cuda.max_memory_allocated() during one step minus the memory allocated before it"
    else:
        timing = ("time.perf_counter around each call after warm-up; providers interleaved; "
                  f"{settings.min_reps}-{settings.max_reps} repeats, about {settings.rep_s:g} s of calls per "
                  f"provider; {torch.get_num_threads()} torch threads "
                  f"({'set by --threads' if threads_set else 'torch default'})")
        peak_method = ("peak of the live bytes allocated through PyTorch's CPU allocator during one step "
                       "(torch.profiler memory events; oneDNN/BLAS scratch not seen)")
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other jobs on the machine move CPU timings: the load average says how busy it was.
        "load_avg_start": _load_avg(),
        "preset": preset,
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "timing": timing,
        "peak_mem_method": peak_method,
        "roofline_peak": dataclasses.asdict(peak) if peak else None,
    }


def default_out(device: torch.device) -> Path:
    tag = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return RESULTS_DIR / f"{tag}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


# ------------------------------------------------------------------------------------------- runner
def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _full(built: Built, grad_out: torch.Tensor):
    return torch.autograd.grad(built.forward(), built.grad_inputs, grad_out)


def run_case(case: Case, device: torch.device, providers: list[Provider], modes: list[str],
             settings: measure.Settings, log, errors: list[dict], progress=None,
             wait_quiet_s: float = 0.0) -> list[dict]:
    """Measure every provider on one case in every mode; failures are logged, never raised."""
    built: dict[str, Built] = {}
    compile_ms: dict[str, float | None] = {}
    saved: dict[str, int | None] = {}

    def fail(name: str, stage: str, e: BaseException) -> None:
        errors.append({"provider": name, "case": case.id, "stage": stage, "error": _one_line(e)})
        log(f"{name} failed on {case.id} ({stage}): {_one_line(e)}")

    try:
        inp = make_inputs(case, device)
    except Exception as e:  # e.g. the inputs alone do not fit in memory
        fail("(inputs)", "inputs", e)
        if progress is not None:
            progress.update(len(modes))
        return []

    # Many-adapter providers need a bank and ids: on a single-adapter case they have nothing to run.
    providers = [p for p in providers if not p.many or case.adapters]
    for p in providers:
        try:
            b = p.build(inp)
            # The first call compiles, autotunes or initialises lazily: timed apart, never in the medians.
            first = measure.wall_ms(device, b.forward if p.forward_only else lambda: _full(b, inp.grad_out))
            compile_ms[p.name] = first if p.compiles else None
            saved[p.name] = measure.saved_bytes(b)
            built[p.name] = b
        except Exception as e:
            fail(p.name, "build", e)

    records = []
    lora = {p.name: p.lora_xs for p in providers}
    case_settings = dataclasses.replace(settings, min_reps=settings.key_min_reps) if case.key else settings
    K, N, r, M = case.in_features, case.out_features, case.rank, case.M
    forward_only = {p.name for p in providers if p.forward_only}
    for mode in modes:
        steps = {name: measure.step_for(b, inp, mode) for name, b in built.items()
                 if mode == "forward" or name not in forward_only}
        if wait_quiet_s > 0:
            measure.wait_for_quiet(BUSY_FRAC, wait_quiet_s)
        with measure.OtherLoad() as other:
            timings = measure.time_interleaved(steps, device, case_settings, on_error=lambda n, e: fail(n, mode, e))
        for name, t in timings.items():
            peak_mem = measure.peak_mem_or_none(steps[name], device, lambda e: log(
                f"{name}: peak memory not measured on {case.id} ({mode}): {_one_line(e)}"))
            n_flops = roofline.flops(M, K, N, r, mode, lora[name])
            n_bytes = roofline.min_bytes(M, K, N, r, mode, case.dtype, lora[name])
            median = t.median_ms
            records.append({
                "provider": name, "mode": mode, "model": case.model, "layer": case.layer,
                "M": M, "in_features": K, "out_features": N, "rank": r, "dtype": case.dtype,
                "adapters": case.adapters, "active": case.active,
                "device": str(device), "key": case.key,
                # Other processes' share of all CPUs while this mode was timed: CPU timings taken
                # beside another job are slower, and not uniformly so (docs/benchmarks.md, caveats).
                "other_cpu_frac": other.frac,
                "median_ms": median, "p20_ms": t.quantile_ms(0.2), "p80_ms": t.quantile_ms(0.8),
                "reps": len(t.times_ms),
                # The raw samples, tagged with their interleaving round: report.py pairs them for ratios.
                "times_ms": [round(v, 5) for v in t.times_ms], "rounds": t.rounds,
                "peak_mem_bytes": peak_mem, "saved_bytes": saved[name],
                "flops": n_flops, "min_bytes": n_bytes,
                "tflops": n_flops / (median * 1e-3) / 1e12, "gbps": n_bytes / (median * 1e-3) / 1e9,
                "compile_ms": compile_ms[name],
            })
        if progress is not None:
            progress.update(1)
    # Drop every reference to this case's tensors (the step closures hold them too) before the next
    # case allocates: the largest GPU cases are hundreds of MB each.
    built = inp = steps = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(name)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.preset in MODEL_PRESETS:
        module = importlib.import_module(f".{MODEL_PRESETS[args.preset]}", __package__)
        out_dir = Path(args.out) if args.out else default_out(device)
        extra = {}
        if args.min_reps:
            if args.preset != "e2e":
                raise SystemExit(f"--min-reps sets the rounds of the layer presets and of e2e, not of {args.preset}")
            extra["rounds"] = args.min_reps
        records = module.run(device, out_dir, log=lambda m: print(m, file=sys.stderr, flush=True), **extra)
        print((out_dir / f"{args.preset}.md").read_text())
        return {args.preset: records}
    providers = select(_csv(args.providers), args.preset)
    modes = [m for m in MODES if m in _csv(args.modes)] or list(MODES)
    cases = cases_for(args.preset, device, tuple(_csv(args.dtypes)) or None)
    if args.key_only:
        cases = [c for c in cases if c.key]
    settings = measure.settings_for(device, args.preset)
    if args.min_reps:
        settings = dataclasses.replace(settings, min_reps=max(settings.min_reps, args.min_reps),
                                       key_min_reps=max(settings.key_min_reps, args.min_reps),
                                       max_reps=max(settings.max_reps, args.min_reps))
    out_dir = Path(args.out) if args.out else default_out(device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    skipped = {}
    runnable = []
    for p in providers:
        reason = p.unavailable_reason(device)
        if reason is None:
            runnable.append(p)
        else:
            skipped[p.name] = reason
            log(f"skip {p.name}: unavailable: {reason}")

    peak = roofline.peak_for(device, quick=args.preset == "smoke")
    env = environment(device, args.preset, peak, settings, threads_set=bool(args.threads))
    env["wait_quiet_s"] = args.wait_quiet
    log(f"{env['device_name']}: preset {args.preset}, {len(cases)} case(s) × {len(modes)} mode(s) × "
        f"{len(runnable)} provider(s) ({', '.join(p.name for p in runnable)}) → {out_dir}")

    progress = None
    if args.preset != "smoke":
        try:
            from tqdm import tqdm
        except ImportError:  # an image without tqdm (the GPU machine's may lack it): no bar, same run
            tqdm = None
        if tqdm is not None:
            progress = tqdm(total=len(cases) * len(modes), unit="case·mode", file=sys.stderr, dynamic_ncols=True)

            def log(msg: str) -> None:  # noqa: F811  (messages above the bar, not through it)
                tqdm.write(msg, file=sys.stderr)

    records: list[dict] = []
    errors: list[dict] = []
    for case in cases:
        if progress is not None:
            progress.set_description(case.id)
        records += run_case(case, device, runnable, modes, settings, log, errors, progress, args.wait_quiet)
    if progress is not None:
        progress.close()

    if device.type == "cpu" and args.preset != "smoke":
        # Probe the CPU again: the faster of two probes is the closer to what the machine can do
        # when other jobs leave it alone.
        peak = roofline.best_of(peak, roofline.peak_for(device))
        env["roofline_peak"] = dataclasses.asdict(peak)
    for r in records:
        r["roofline_frac"] = (peak.roofline_frac(r["flops"], r["min_bytes"], r["dtype"], r["median_ms"])
                              if peak else None)
    env["wall_s"] = round(time.perf_counter() - t_start, 1)
    env["load_avg_end"] = _load_avg()
    make_plots = not args.no_plots
    if make_plots and importlib.util.find_spec("matplotlib") is None:
        log("no plots: matplotlib is not installed (pip install matplotlib); results.json and results.md are written")
        make_plots = False
    paths = report.write(out_dir, env, records, skipped, errors, make_plots=make_plots)

    print(report.key_section(records) or "(no key case in this run)")
    print(f"{len(records)} measurements in {env['wall_s']:.0f} s on {env['device_name']}")
    measured = {report.case_key(r) + (r["mode"],) for r in records}
    busy = {report.case_key(r) + (r["mode"],) for r in records if (r.get("other_cpu_frac") or 0) >= BUSY_FRAC}
    if busy and device.type == "cpu":
        n_modes = len(measured)
        print(f"warning: other processes used ≥{BUSY_FRAC:.0%} of the CPUs during {len(busy)} of {n_modes} "
              "(case, mode) measurements; their times and ratios are not comparable with a quiet machine's "
              "(see 'CPU used by other processes' in results.md)")
    print(f"results: {paths['md']}")
    print(f"         {paths['json']}")
    for png in paths["plots"]:
        print(f"         {png}")
    model_runs = {}
    if args.preset == "quick" and not args.key_only and not args.providers:
        # The main job shows whole models too: a small training step against PEFT (e2e) and a Zipf stream over
        # 1,000 adapters behind one model (store), each in its own subfolder; a failure there is reported, not fatal.
        for name in DEFAULT_MODEL_PRESETS:
            sub = out_dir / name
            try:
                module = importlib.import_module(f".{MODEL_PRESETS[name]}", __package__)
                model_runs[name] = module.run(device, sub, log=log, quick=True)
                print((sub / f"{name}.md").read_text())
            except Exception as e:  # noqa: BLE001  (one section failing must not hide the others)
                print(f"{name}: failed: {_one_line(e)}")
                errors.append({"preset": name, "error": _one_line(e)})
    return {"out_dir": out_dir, "records": records, "skipped": skipped, "errors": errors, **paths, **model_runs}


if __name__ == "__main__":
    main()
