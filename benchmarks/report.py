"""The outputs of a run: results.json (everything), results.md (tables) and PNG plots.

Ratios, everywhere in this package:
    vs nn_linear = time / time(nn_linear)   the overhead over the bare frozen layer; 1.00 is the floor
    vs unfused   = time(unfused) / time     the speedup over the LoRA-XS chain people run today
each the median over interleaved rounds of the per-round ratio (measure.paired_ratio).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from .cases import MODES
from .measure import Timing, paired_ratio
from .providers import FUSED, MULTI, PROVIDERS

RATIO_TICKS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
MODE_TITLES = {"forward": "forward", "backward": "backward", "full": "full (fwd+bwd)"}


# --------------------------------------------------------------------------------------- formatting
def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.1, 3)):
        if v >= limit:
            return f"{v:.{digits}f}"
    return f"{v:.4f}"


def fmt_bytes(v: int | None) -> str:
    if v is None:
        return "—"
    if v >= 2**20:
        return f"{v / 2**20:.2f} MiB"
    if v >= 2**10:
        return f"{v / 2**10:.1f} KiB"
    return f"{v} B"


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def fmt_num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def fmt_frac(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


# ------------------------------------------------------------------------------------------ ratios
def case_key(r: dict) -> tuple:
    return (r["model"], r["layer"], r["in_features"], r["out_features"], r["M"], r["rank"], r["dtype"],
            r.get("adapters", 0), r.get("active", 0))


def _timing(r: dict) -> Timing:
    return Timing(r["times_ms"], r["rounds"])


def add_ratios(records: list[dict]) -> None:
    """Fill vs_nn_linear and vs_unfused on every record from its (case, mode) siblings, as medians
    of per-round ratios (measure.paired_ratio): steadier than a ratio of medians on a busy machine."""
    by = defaultdict(dict)
    for r in records:
        by[case_key(r) + (r["mode"],)][r["provider"]] = r
    for group in by.values():
        floor, unfused = group.get("nn_linear"), group.get("unfused")
        # Many-adapter cases: against the fastest single-adapter backend (the whole batch through one
        # R: issue 11's yardstick), and each provider's time over the multi op's.
        fused = min((group[n] for n in FUSED if n in group), key=lambda r: r["median_ms"], default=None)
        multi = group.get("multi")
        for r in group.values():
            r["vs_nn_linear"] = paired_ratio(_timing(r), _timing(floor)) if floor else None
            r["vs_unfused"] = paired_ratio(_timing(unfused), _timing(r)) if unfused else None
            if r.get("adapters"):
                r["vs_fused"] = paired_ratio(_timing(r), _timing(fused)) if fused else None
                r["fused_name"] = fused["provider"] if fused else None
                r["vs_multi"] = paired_ratio(_timing(r), _timing(multi)) if multi else None


def _order(records: list[dict]) -> list[dict]:
    names = list(PROVIDERS)
    return sorted(records, key=lambda r: (MODES.index(r["mode"]), names.index(r["provider"])))


def _cases(records: list[dict]) -> list[tuple]:
    """Distinct cases, grouped by dtype, model, shape and rank, M ascending."""
    seen = {case_key(r): r for r in records}
    return sorted(seen, key=lambda k: (k[6], k[0], k[1], k[5], k[4]))


def _describe(k: tuple) -> str:
    model, layer, K, N, M, r, dtype, adapters, active = k
    many = f", {active} of {adapters} adapters" if adapters else ""
    return f"{model} {layer}: {K}→{N}, M={M}, r={r}, {dtype}{many}"


# ----------------------------------------------------------------------------------------- tables
HEADER = ("| mode | provider | median ms | p20–p80 ms | vs nn_linear | vs unfused | TFLOP/s | GB/s "
          "| roofline | saved for bwd | peak mem | compile s |")
RULE = "|" + "---|" * 12


MULTI_HEADER = ("| mode | provider | median ms | p20–p80 ms | vs nn_linear | vs fused | vs multi | saved for bwd "
                "| peak mem | compile s |")
MULTI_RULE = "|" + "---|" * 10


def case_table(rows: list[dict]) -> str:
    many = any(r.get("adapters") for r in rows)
    lines = [MULTI_HEADER, MULTI_RULE] if many else [HEADER, RULE]
    for r in _order(rows):
        compile_s = None if r.get("compile_ms") is None else r["compile_ms"] / 1e3
        head = f"| {r['mode']} | {r['provider']} | {fmt_ms(r['median_ms'])} | {fmt_ms(r['p20_ms'])}–{fmt_ms(r['p80_ms'])} | "
        tail = f"{fmt_bytes(r['saved_bytes'])} | {fmt_bytes(r['peak_mem_bytes'])} | {fmt_num(compile_s, 1)} |"
        if many:
            lines.append(head + f"{fmt_ratio(r.get('vs_nn_linear'))} | {fmt_ratio(r.get('vs_fused'))} | "
                         f"{fmt_ratio(r.get('vs_multi'))} | " + tail)
        else:
            lines.append(head + f"{fmt_ratio(r.get('vs_nn_linear'))} | {fmt_ratio(r.get('vs_unfused'))} | "
                         f"{fmt_num(r['tflops'], 3)} | {fmt_num(r['gbps'], 1)} | {fmt_frac(r['roofline_frac'])} | "
                         + tail)
    return "\n".join(lines)


def headline(rows: list[dict], mode: str = "full") -> list[str]:
    """The two numbers quoted for a case: each fused backend's overhead over nn_linear and its
    speedup over unfused, in one mode."""
    by = {r["provider"]: r for r in rows if r["mode"] == mode}
    out = []
    if any(r.get("adapters") for r in rows):
        return multi_headline(rows)
    for name in FUSED:
        r = by.get(name)
        if r is None:
            continue
        out.append(
            f"- **{name}** ({MODE_TITLES[mode]}): {fmt_ms(r['median_ms'])} ms; "
            f"fused / nn_linear = **{fmt_ratio(r['vs_nn_linear'])}**; "
            f"unfused / fused = **{fmt_ratio(r['vs_unfused'])}**"
        )
    return out


def multi_headline(rows: list[dict]) -> list[str]:
    """Issue 11's numbers for a many-adapter case: each multi backend over nn_linear and over the
    fastest single-adapter backend, and how much slower the loop and PEFT's mixed batch are."""
    out = []
    for mode in MODES:
        by = {r["provider"]: r for r in rows if r["mode"] == mode}
        for name in MULTI:
            r = by.get(name)
            if r is None:
                continue
            others = "; ".join(f"{o} / {name} = **{fmt_ratio(paired(by[o], r))}**"
                               for o in ("multi_loop", "peft_lora_mixed") if o in by)
            out.append(f"- **{name}** ({MODE_TITLES[mode]}): {fmt_ms(r['median_ms'])} ms; "
                       f"{name} / nn_linear = **{fmt_ratio(r['vs_nn_linear'])}**; {name} / fused "
                       f"({r.get('fused_name')}) = **{fmt_ratio(r.get('vs_fused'))}**" + (f"; {others}" if others else ""))
    return out


def paired(a: dict, b: dict) -> float | None:
    """time(a) / time(b), the median of per-round ratios."""
    return paired_ratio(_timing(a), _timing(b))


def _load_line(rows: list[dict]) -> str:
    loads = {r["mode"]: r["other_cpu_frac"] for r in rows if r.get("other_cpu_frac") is not None}
    if not loads:
        return ""
    text = ", ".join(f"{m} {100 * loads[m]:.0f} %" for m in MODES if m in loads)
    return f"- CPU used by other processes while each mode was timed: {text}"


def key_section(records: list[dict]) -> str:
    keyed = [r for r in records if r.get("key")]
    if not keyed:
        return ""
    k = case_key(keyed[0])
    rows = [r for r in records if case_key(r) == k]
    parts = [f"## Key case: {_describe(k)}", ""]
    parts += headline(rows) or ["- no fused backend ran on this case"]
    parts.append(_load_line(rows))
    parts += ["", case_table(rows), ""]
    return "\n".join(parts)


def _peaks_line(peak: dict | None) -> str:
    if not peak:
        return "Roofline peaks: none for this device (not in the table in benchmarks/roofline.py)."
    rates = ", ".join(f"{dtype} {v:.3g} TFLOP/s" for dtype, v in peak["tflops"].items())
    return f"Roofline peaks: {peak['name']}: {rates}, {peak['gbps']:.4g} GB/s. Source: {peak['source']}."


def markdown(env: dict, records: list[dict], skipped: dict, errors: list[dict]) -> str:
    peak = env.get("roofline_peak")
    parts = [
        f"# LoRA-XS microbenchmarks: {env['device_name']}",
        "",
        f"Preset `{env['preset']}` · {env['timestamp']} · torch {env['torch']} · triton {env['triton']} · "
        f"peft {env['peft']} · commit {env['git_commit']} · Python {env['python']} · "
        f"{env['cpu_count']} CPUs ({env['torch_threads']} torch threads) · load average (1/5/15 min) "
        f"{env.get('load_avg_start')} at start, {env.get('load_avg_end')} at end · {env.get('wall_s')} s",
        "",
        f"Timing: {env['timing']}",
        "",
        "Many-adapter cases (preset multi) show **vs fused** = time / time(fastest single-adapter backend, the "
        "whole batch through one R) and **vs multi** = time / time(multi) instead of vs unfused and the roofline. "
        "Columns: median and 20/80 % quantiles of the time per call; **vs nn_linear** = time / "
        "time(nn_linear) (overhead over the bare frozen layer, lower is better, 1.00× is the floor); "
        "**vs unfused** = time(unfused) / time (speedup over the plain LoRA-XS chain, higher is better); "
        "both ratios are medians of per-round ratios of interleaved calls, so they can differ slightly "
        "from the ratio of the median columns; "
        "TFLOP/s, GB/s and roofline from the model in benchmarks/roofline.py; saved for bwd = bytes "
        "autograd keeps between forward and backward (layer parameters excluded); peak mem = "
        f"{env['peak_mem_method']}; compile s = first call of a compiling provider (not in the timings).",
        "",
        _peaks_line(peak),
        "",
    ]
    parts.append(key_section(records))
    if skipped:
        parts += ["## Skipped providers", ""]
        parts += [f"- `{name}`: unavailable: {reason}" for name, reason in skipped.items()]
        parts.append("")
    if errors:
        parts += ["## Errors", ""]
        parts += [f"- `{e['provider']}` on {e['case']} ({e['stage']}): {e['error']}" for e in errors]
        parts.append("")
    parts += ["## All cases", ""]
    for k in _cases(records):
        rows = [r for r in records if case_key(r) == k]
        parts += [f"### {_describe(k)}", ""] + headline(rows) + [_load_line(rows), "", case_table(rows), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- plots
def plots(out_dir: Path, records: list[dict], mode: str = "full") -> list[Path]:
    """One PNG per (dtype, shape): a row per rank, speedup over unfused (left) and overhead over
    nn_linear (right) against M, for one mode (the training step by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # Many-adapter cases have their own yardsticks (vs fused, vs multi) and too few M to plot.
    rows = [r for r in records if r["mode"] == mode and not r.get("adapters")]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["in_features"], r["out_features"])].append(r)
    paths = []
    names = list(PROVIDERS)
    # One colour per provider across every panel and file, so a line is recognisable at a glance.
    colour = {name: f"C{i}" for i, name in enumerate(names)}
    for (dtype, K, N), recs in sorted(groups.items()):
        ranks = sorted({r["rank"] for r in recs})
        fig, axes = plt.subplots(len(ranks), 2, figsize=(11, 3.6 * len(ranks)), squeeze=False)
        for i, rank in enumerate(ranks):
            for j, (metric, baseline, title) in enumerate((
                ("vs_unfused", "unfused", "speedup over unfused (higher is better)"),
                ("vs_nn_linear", "nn_linear", "time / nn_linear (lower is better)"),
            )):
                ax = axes[i][j]
                by_provider = defaultdict(list)
                for r in recs:
                    if r["rank"] == rank and r.get(metric) is not None and r["provider"] != baseline:
                        by_provider[r["provider"]].append((r["M"], r[metric]))
                for name in sorted(by_provider, key=names.index):
                    pts = sorted(by_provider[name])
                    style = "--" if name in ("nn_linear", "unfused") else "-"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name,
                            color=colour[name])
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                # Log ratios: 2× faster and 2× slower sit equally far from 1, and one outlier at small
                # M (a compiled graph's fixed overhead) does not flatten every other line.
                ax.set_yscale("log")
                lo, hi = ax.get_ylim()
                ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([t for t in RATIO_TICKS if lo <= t <= hi]))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlabel("tokens M")
                ax.set_title(f"r={rank}: {title}", fontsize=10)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
        model = recs[0]["model"]
        fig.suptitle(f"{model} {K}→{N}, {dtype}, {MODE_TITLES[mode]}, {recs[0]['device']}")
        fig.tight_layout()
        path = out_dir / f"{dtype}-{K}x{N}-{mode}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ writing
def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write(out_dir: Path, env: dict, records: list[dict], skipped: dict, errors: list[dict],
          make_plots: bool = True) -> dict:
    """Write the three outputs; return {"json", "md", "plots"} paths."""
    os.makedirs(out_dir, exist_ok=True)
    add_ratios(records)
    clean = [{k: _json_safe(v) for k, v in r.items()} for r in records]
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({"environment": env, "skipped": skipped, "errors": errors,
                                     "records": clean}, indent=1) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(env, records, skipped, errors) + "\n")
    png = plots(out_dir, records) if make_plots and records else []
    return {"json": json_path, "md": md_path, "plots": png}
