"""How a (provider, case, mode) is measured: time, bytes saved for backward, peak memory.

Time. The providers of one (case, mode) are timed interleaved: round i times every provider once,
in an order shuffled afresh each round (round_orders). On a shared machine (CI, a 2-core box other
jobs use) a burst of background load then lands on every provider instead of whichever happened to
run during the busy second, and ratios are taken per round (paired_ratio). Sustained load still
slows multi-op layers more than one GEMM (docs/benchmarks.md, caveats), which the recorded load
average lets a reader spot.
- GPU: CUDA events around each call, after warm-up; a 256 MiB buffer is zeroed before each call
  (outside the events) so the weights are not served from L2 across calls, as in triton's do_bench.
- CPU: time.perf_counter around each call; torch's thread count is left as it is (the CLI's
  --threads sets it).
The first call of a provider (compile, autotune, lazy init) is never timed: the runner reports it
apart as compile_ms.

Memory.
- saved_bytes: the bytes autograd keeps for the backward, from torch.autograd.graph.saved_tensors_hooks:
  the unique storages of the saved tensors, minus the layer's own parameters and buffers (saving a
  parameter costs no memory). Exact on every device.
- peak_mem_bytes on GPU: torch.cuda.max_memory_allocated() during one step, minus what was
  allocated before it.
- peak_mem_bytes on CPU: the CPU allocator keeps no peak counter, so one step runs under
  torch.profiler with profile_memory=True and the peak of the running sum of its allocation and
  free events after the step's start marker is taken. It counts tensors made through PyTorch's CPU
  allocator; scratch memory that oneDNN/BLAS allocate on their own is not seen. None when the
  profiler's event list cannot be read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import time
from typing import Any, Callable

import torch

from .providers import Built, Inputs


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to measure. Repeats are chosen so each provider gets about rep_s of timed calls,
    within [min_reps, max_reps]: enough for stable medians, bounded for slow cases."""

    warmup_s: float
    rep_s: float
    min_reps: int
    max_reps: int
    key_min_reps: int  # the floor for the preset's key case
    warmup_calls: int = 2


def settings_for(device: torch.device, preset: str) -> Settings:
    # warmup_calls=1: the runner's untimed first call (compile, autotune, lazy init) already warmed
    # every provider, so one more call per mode only has to estimate the time per call.
    if preset == "smoke":
        return Settings(warmup_s=0.0, rep_s=0.02, min_reps=3, max_reps=10, key_min_reps=3, warmup_calls=1)
    if device.type == "cuda":
        return Settings(warmup_s=0.025, rep_s=0.05, min_reps=10, max_reps=200, key_min_reps=25, warmup_calls=2)
    # CPU: the biggest quick case (1024→4096 over 2048 tokens) takes 0.3-1 s per fwd+bwd on 2 shared
    # cores, so there the floor of repeats, not rep_s, bounds the run; the key case, whose ratios get
    # quoted, gets more.
    return Settings(warmup_s=0.2, rep_s=0.5, min_reps=5, max_reps=50, key_min_reps=11, warmup_calls=1)


@dataclasses.dataclass
class Step:
    """One timed call: run(setup()); setup's work (the forward before a lone backward) is not timed."""

    run: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None


def step_for(built: Built, inp: Inputs, mode: str) -> Step:
    def grad(y):
        return torch.autograd.grad(y, built.grad_inputs, inp.grad_out)

    if mode == "forward":
        return Step(lambda _: built.forward())
    if mode == "backward":
        return Step(grad, setup=built.forward)
    if mode == "full":
        return Step(lambda _: grad(built.forward()))
    raise ValueError(f"unknown mode {mode!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(device: torch.device, fn: Callable[[], Any]) -> float:
    """Wall time of one synchronised call, for first calls that compile (not for timings)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    t1 = time.perf_counter()
    del out
    return (t1 - t0) * 1e3


@dataclasses.dataclass
class Timing:
    times_ms: list[float]
    rounds: list[int]  # the round each time was taken in: times of one round were taken back to back

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        return quantile(self.times_ms, q)


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def round_ratios(num: Timing, den: Timing) -> list[float]:
    """num/den in each round both were timed in, in num's round order."""
    b = dict(zip(den.rounds, den.times_ms))
    return [t / b[i] for i, t in zip(num.rounds, num.times_ms) if i in b and b[i] > 0]


def paired_ratio(num: Timing, den: Timing) -> float:
    """median over rounds of num/den, from the rounds both were timed in (the ratio of medians when
    fewer than 3 are shared). Calls of one round ran seconds apart at most, so a burst of background
    load scales both sides of each ratio, and the median of ratios shrugs off what the median of
    each side alone does not."""
    ratios = round_ratios(num, den)
    if len(ratios) < 3:
        return num.median_ms / den.median_ms
    return statistics.median(ratios)


def paired_ratio_ci(num: Timing, den: Timing, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float] | None:
    """A percentile-bootstrap interval for paired_ratio: resample the shared rounds with replacement,
    take each resample's median of num/den, return the (1-level)/2 and (1+level)/2 quantiles. None
    under 5 shared rounds (too few for an interval to mean anything). It says how far the measured
    median could move on a rerun of the same length on a machine as noisy as this run's, so a goal
    within it is not decided by the run."""
    ratios = round_ratios(num, den)
    if len(ratios) < 5:
        return None
    rng = random.Random(seed)
    n = len(ratios)
    medians = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return quantile(medians, tail), quantile(medians, 1 - tail)


class _Timer:
    """Times single calls; on CUDA the results are read once the queued work is done."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        self._pending: list[tuple[str, int, Any, Any]] = []

    def time(self, name: str, round_: int, step: Step, out: dict[str, list[tuple[int, float]]]) -> None:
        arg = step.setup() if step.setup is not None else None
        if self.cuda:
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = step.run(arg)
            end.record()
            self._pending.append((name, round_, start, end))
        else:
            t0 = time.perf_counter()
            res = step.run(arg)
            t1 = time.perf_counter()
            out[name].append((round_, (t1 - t0) * 1e3))
        del res, arg  # freed outside the timed region on CPU

    def collect(self, out: dict[str, list[tuple[int, float]]]) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for name, round_, start, end in self._pending:
                out[name].append((round_, start.elapsed_time(end)))
            self._pending.clear()


def round_orders(names: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order the providers run in, one list per round: a fresh shuffle each round (seeded, so a
    run repeats). Rotating one fixed order kept each provider's neighbours: one that always ran right
    after another paid for whatever that one left behind in every round. By hand on the e2e MiniLM
    case: peft_tinylora+ours, always right after official_loraxs, came out 1.048x ours; with the order
    reversed, 1.012x (both within that machine's round-to-round spread, which shuffling does not
    narrow: it only stops one order from being measured every time)."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def time_interleaved(steps: dict[str, Step], device: torch.device, settings: Settings,
                     on_error: Callable[[str, BaseException], None]) -> dict[str, Timing]:
    """Time each step; a step that raises is dropped (on_error is told) and the rest go on."""
    timer = _Timer(device)
    active = dict(steps)

    def guarded(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # e.g. out of memory in one provider: report it, keep the others
            active.pop(name, None)
            on_error(name, e)

    # Warm-up, which also estimates each call's time to choose the number of repeats.
    estimate: dict[str, float] = {}
    for name, step in list(active.items()):
        def warm(name=name, step=step):
            calls, t0 = 0, time.perf_counter()
            while calls < settings.warmup_calls or time.perf_counter() - t0 < settings.warmup_s:
                arg = step.setup() if step.setup is not None else None
                sync(device)
                t1 = time.perf_counter()
                res = step.run(arg)
                sync(device)
                estimate[name] = time.perf_counter() - t1
                del res, arg
                calls += 1
        guarded(name, warm)

    per_round = sum(estimate[n] for n in active) or 1e-6
    reps = max(settings.min_reps, min(settings.max_reps, math.ceil(settings.rep_s * len(active) / per_round)))

    times: dict[str, list[tuple[int, float]]] = {name: [] for name in active}
    for i, order in enumerate(round_orders(list(active), reps)):
        for name in order:
            if name in active:
                guarded(name, lambda: timer.time(name, i, active[name], times))
        guarded("(timing)", lambda: timer.collect(times))
    return {name: Timing([t for _, t in times[name]], [i for i, _ in times[name]])
            for name in active if times[name]}


class OtherLoad:
    """The share of the machine's CPU time that other processes used while a block ran, from
    /proc/stat (all CPUs) minus this process's own CPU time; None where /proc/stat is absent.
    A 1-minute load average lags by a minute; this says what happened during the measurement.

        with OtherLoad() as load: ...
        load.frac   # 0.0: the machine was ours; 0.5 on 2 cores: another job held one core
    """

    frac: float | None = None

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        ticks = [int(v) for v in lines[0].split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        n_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        own = os.times()
        busy_s = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is inside user
        return time.perf_counter(), busy_s, own.user + own.system, n_cpus

    def __enter__(self):
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        if self._start is not None and end is not None:
            wall = end[0] - self._start[0]
            other = (end[1] - self._start[1]) - (end[2] - self._start[2])
            if wall > 0 and end[3] > 0:
                self.frac = min(1.0, max(0.0, other / (wall * end[3])))
        return False


def wait_for_quiet(max_other: float, timeout_s: float, probe_s: float = 1.0) -> float | None:
    """Sleep in probe_s steps until other processes use less than max_other of the CPUs (measured
    while this process idles), or timeout_s passes; return the last share seen (None: unknown)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        with OtherLoad() as load:
            time.sleep(probe_s)
        if load.frac is None or load.frac < max_other or time.perf_counter() >= deadline:
            return load.frac


# ------------------------------------------------------------------------------------------ memory
def saved_bytes(built: Built) -> int:
    """Bytes autograd keeps for the backward of one forward, the layer's own tensors excluded."""
    owned = {t.untyped_storage().data_ptr() for t in built.owned}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = built.forward()
    del y
    return sum(kept.values())


def peak_mem_bytes(step: Step, device: torch.device) -> int | None:
    """Peak bytes allocated during one step beyond what was allocated before it (see module doc)."""
    if device.type == "cuda":
        arg = step.setup() if step.setup is not None else None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        res = step.run(arg)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del res, arg
        return peak
    if device.type == "cpu":
        return _cpu_peak(step)
    return None


def peak_mem_or_none(step: Step, device: torch.device, on_error) -> int | None:
    """peak_mem_bytes, or None after on_error(exception) when the measurement itself fails (a report
    row keeps its timing without a peak)."""
    try:
        return peak_mem_bytes(step, device)
    except Exception as e:  # noqa: BLE001  reported through on_error, the row stays
        on_error(e)
        return None


_MARK = "benchmarks.measured_step"


def _cpu_peak(step: Step) -> int | None:
    # Kineto prints "profiler_start/stop" lines on stderr for every session unless its log level is
    # raised; level 6 silences them (an explicit setting by the user wins).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile, record_function

    try:
        # The setup (the forward before a lone backward) runs inside the profiled window too: the
        # profiler cannot size a free of a block allocated before it started, so the backward's
        # release of saved activations would otherwise go uncounted. A marker splits setup from step.
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            arg = step.setup() if step.setup is not None else None
            with record_function(_MARK):
                res = step.run(arg)
            del res, arg
        events = list(prof.profiler.kineto_results.events())
        start = min(e.start_ns() for e in events if e.name() == _MARK)
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # a private profiler API that may move: no number rather than a crash
        return None
    live = 0
    before = peak = None
    for t, nbytes in deltas:
        if t >= start and before is None:
            before = peak = live
        live += nbytes
        if before is not None:
            peak = max(peak, live)
    return 0 if before is None else peak - before
