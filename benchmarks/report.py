"""The report: docs/benchmarks.md, its tables, and PNG plots next to it."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .run import BASELINES, PEER, Scenario, fmt

PLOTS = {  # plot file -> (scenario ids, metric, y label)
    "fanout.png": (("fanout_small", "fanout_large"), "per_s", "deliveries/s (higher is better)"),
    "latency.png": (("latency",), "p99_ms", "p99 latency, ms (lower is better)"),
    "slow.png": (("slow",), "relative", "readers' throughput with a stalled client,\n"
                 "relative to without (1 = unaffected)"),
    "idle_memory.png": (("idle",), "kib_per_conn", "KiB per idle connection (lower is better)"),
}


def _values(runs: list[dict[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in runs if key in r]


def _cell(runs: list[dict[str, Any]], key: str, spec: str) -> str:
    values = _values(runs, key)
    if not values:
        errors = {r["error"] for r in runs if "error" in r}
        return "error: " + "; ".join(sorted(errors))[:120] if errors else "–"
    if spec == "s":  # text: the most common one, and how many agreed
        common = max(set(values), key=values.count)
        return common if len(values) == 1 else f"{common} ({values.count(common)}/{len(values)})"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, spec)
    return f"{fmt(med, spec)} ({fmt(min(values), spec)}–{fmt(max(values), spec)})"


def _median(runs: list[dict[str, Any]] | None, key: str) -> float | None:
    values = _values(runs or [], key)
    return statistics.median(values) if values else None


def table(sc: Scenario, results: dict[str, list[dict[str, Any]]]) -> list[str]:
    key = sc.metrics[0][0]
    heads = ["peer", *(h for _, h, _ in sc.metrics)]
    if sc.ratios:
        heads += [f"× {b}" for b in BASELINES]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name in sc.peers:
        if name not in results:
            continue
        runs = results[name]
        row = [PEER[name].label, *(_cell(runs, k, f) for k, _, f in sc.metrics)]
        if sc.ratios:
            mine = _median(runs, key)
            for base in BASELINES:
                ref = _median(results.get(base), key)
                row.append(f"{mine / ref:.2f}" if mine is not None and ref else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _short(value: float) -> str:
    return f"{value / 1000:.0f}k" if value >= 10_000 else f"{value:.3g}"


def plot(path: Path, plan: list[Scenario], results: dict[str, Any], ids: tuple[str, ...],
         key: str, ylabel: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [sc for sc in plan if sc.id in ids and sc.id in results]
    if not groups:
        return False
    names = [p for p in PEER if any(p in results[sc.id] for sc in groups)]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    width = 0.8 / max(1, len(groups))
    for g, sc in enumerate(groups):
        meds, lo, hi = [], [], []
        for name in names:
            values = _values(results[sc.id].get(name, []), key)
            med = statistics.median(values) if values else 0.0
            meds.append(med)
            lo.append(med - min(values) if values else 0.0)
            hi.append(max(values) - med if values else 0.0)
        xs = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=sc.title)
        ax.bar_label(bars, labels=[_short(m) for m in meds], fontsize=7, padding=2)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    else:
        ax.set_title(groups[0].title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(out: Path, assets: Path, plan: list[Scenario],
                 results: dict[str, dict[str, list[dict[str, Any]]]],
                 meta: dict[str, Any]) -> None:
    rel = assets.name
    lines = [
        "# Benchmarks",
        "",
        "wsroom against the usual ways of broadcasting to WebSocket clients in Python, "
        "written by `python -m benchmarks.run"
        + (" --quick`: **a smoke run (one repetition, small N): these numbers mean "
           "nothing**." if meta["quick"] else "`."),
        "How each scenario is measured, and how to run it: `benchmarks/README.md`.",
        "",
        f"Server pinned to core 0 and one load-client process to core 1, over loopback; a "
        f"fresh server for every repetition; {meta['reps']} repetition(s): the median, with "
        "min–max in brackets. `× websockets` and `× socketio` divide the median of the "
        "first column by that peer's (for latency and memory, below 1 is better).",
        "",
        "Peers: **websockets** is the websockets library's own server with "
        "`websockets.broadcast`; every other peer runs on uvicorn (`--ws websockets-sansio`, "
        f"`--loop {meta['versions']['loop']}`). Messages: about 200 bytes of JSON data "
        "(wsroom's frame adds its envelope: stream, epoch, offset, event). The load client "
        f"is one process of picows {meta['versions'].get('picows', '?')} connections: raw "
        "WebSocket for the websockets and Starlette peers, engine.io v4 over WebSocket "
        "written out by hand for python-socketio, wsroom's wire protocol (hello, pong, "
        "resume) written out by hand for wsroom.",
        "",
        "wsroom runs with its defaults, and with uvicorn's `--ws-ping-interval 0` as its "
        "deploy guide recommends, except: no per-address admission limits (every "
        "client is 127.0.0.1), no presence in the room (no peer has it), and a room history "
        "of 50,000 messages (the stalled client's resume needs more than the default "
        "10,000). Publishing loops yield to the event loop once per message (wsroom's "
        "`publish` does it itself).",
        "",
    ]
    drawn = {name for name, (ids, key, ylabel) in PLOTS.items()
             if plot(assets / name, plan, results, ids, key, ylabel)}
    for sc in plan:
        if sc.id not in results:
            continue
        lines += [f"## {sc.title}", "", sc.what, "", *table(sc, results[sc.id]), ""]
        lines += [f"![{sc.title}]({rel}/{name})\n" for name, (ids, _, _) in PLOTS.items()
                  if name in drawn and ids[-1] == sc.id]
    lines += ["## Versions", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta["versions"].items()]
    lines += ["", f"Run on {meta['date']}, {meta['seconds']:.0f} s; raw results: "
              f"[{rel}/results.json]({rel}/results.json).", ""]
    out.write_text("\n".join(lines))
