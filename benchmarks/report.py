"""The report: docs/benchmarks.md, its tables, and PNG plots next to it."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .run import PEER, Scenario, fmt

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


def table(sc: Scenario, results: dict[str, list[dict[str, Any]]],
          metrics: list[tuple[str, str, str]] | None = None) -> list[str]:
    """The scenario's table (with its ratio columns), or one of other `metrics` (without)."""
    key = sc.metrics[0][0]
    ratios = sc.ratio_columns() if metrics is None else {}
    metrics = metrics or sc.metrics
    heads = ["peer", *(h for _, h, _ in metrics), *ratios.values()]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name in sc.peers:
        if name not in results:
            continue
        runs = results[name]
        row = [sc.label(name), *(_cell(runs, k, f) for k, _, f in metrics)]
        mine = _median(runs, key)
        for base in ratios:
            ref = _median(results.get(base), key)
            row.append(f"{mine / ref:.2f}" if mine is not None and ref else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def redis_summary(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What the redis_fanout tables say, in words, from their medians (a sentence is
    left out when a number it needs is missing)."""
    def med(name: str, key: str) -> float | None:
        return _median(results.get(name), key)

    def us(value: float) -> str:
        return f"{value:.1f} µs"

    out = []
    mem, one, two = (med(n, "per_s") for n in ("wsroom", "wsroom-redis", "wsroom-redis-2w"))
    if mem and one:
        out.append(f"On one worker, the Redis backplane delivered {one:,.0f} messages/s, "
                   f"{one / mem:.2f}× the in-memory backplane's {mem:,.0f}/s.")
    loop_m, loop_r = med("wsroom", "loop_us"), med("wsroom-redis", "loop_us")
    wait_m, wait_r = med("wsroom", "backplane_us"), med("wsroom-redis", "backplane_us")
    if loop_m is not None and loop_r is not None and wait_m is not None and wait_r is not None:
        out.append(f"Per message, A's publish loop took {us(loop_r)} on Redis against "
                   f"{us(loop_m)} in memory; of it, A awaited the backplane's publish for "
                   f"{us(wait_r)} on Redis against {us(wait_m)} in memory.")
    cpu_r, script_r = med("wsroom-redis", "redis_cpu_us"), med("wsroom-redis", "script_us")
    if wait_r is not None and cpu_r is not None and script_r is not None:
        out.append(f"Redis itself used {us(cpu_r)} of CPU per message, {us(script_r)} of it "
                   f"running the publish script: the rest of the {us(wait_r)} A waited is "
                   "redis-py, the loopback round trip, the delivery to A's own clients, "
                   "and A's event loop serving its clients before it resumed the publisher.")
    cpu_a1, cpu_m = med("wsroom-redis", "a_cpu_us"), med("wsroom", "a_cpu_us")
    if cpu_a1 is not None and cpu_m is not None:
        text = (f"Worker A's own CPU per message: {us(cpu_a1)} on Redis, {us(cpu_m)} in "
                "memory")
        batch_r, batch_m = med("wsroom-redis", "a_batch"), med("wsroom", "a_batch")
        if batch_r is not None and batch_m is not None:
            text += (f"; it wrote {batch_r:.2f} messages per WebSocket frame on Redis "
                     f"against {batch_m:.2f} in memory (every frame is a send: while the "
                     "publisher awaits Redis, the writers catch up and send smaller "
                     "batches)")
        out.append(text + ".")
    a2, b2 = med("wsroom-redis-2w", "a_per_s"), med("wsroom-redis-2w", "b_per_s")
    if two and one and a2 and b2:
        text = (f"With two workers sharing one core, all clients together got {two:,.0f}/s "
                f"({two / one:.2f}× one worker on Redis): A's clients {a2:,.0f}/s and "
                f"B's, which get every message through Redis, {b2:,.0f}/s")
        lag = med("wsroom-redis-2w", "b_lag_ms")
        if lag is not None:
            text += (f"; B's last delivery came {abs(lag):,.1f} ms "
                     f"{'after' if lag >= 0 else 'before'} A's")
        out.append(text + ".")
    cpu_a2, cpu_b2 = med("wsroom-redis-2w", "a_cpu_us"), med("wsroom-redis-2w", "b_cpu_us")
    if cpu_a2 is not None and cpu_b2 is not None:
        out.append(f"There, per message, A used {us(cpu_a2)} of CPU (publishing, and "
                   f"delivering to its half of the clients) and B {us(cpu_b2)} (reading the "
                   "message from Redis and delivering it to the other half).")
    busy = [v for n in results for v in _values(results[n], "client_cpu")]
    if busy and max(busy) > 0.9:
        out.append(f"The load client used up to {max(busy):.0%} of its core: where it is "
                   "near 100 %, the client, not the server, set the pace.")
    return [" ".join(out), ""] if out else []


def _ratio(results: dict[str, dict[str, list[dict[str, Any]]]], sc: str, key: str,
           base: str) -> float | None:
    mine = _median(results.get(sc, {}).get("wsroom"), key)
    ref = _median(results.get(sc, {}).get(base), key)
    return mine / ref if mine is not None and ref else None


def _times(value: float, bound: float) -> str:
    """`value` as a ratio, with a third decimal when two would look like the bound."""
    return f"{value:.3f}×" if round(value, 2) == bound and value != bound else f"{value:.2f}×"


def targets(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """The performance targets of the issue that asked for this harness, each with what
    this run measured and whether it is met (computed here, never written by hand)."""
    rows: list[tuple[str, str, bool | None]] = []

    def ratio_row(what: str, sc: str, key: str, base: str, bound: float,
                  at_least: bool) -> None:
        value = _ratio(results, sc, key, base)
        if sc not in results:
            return
        if value is None:
            rows.append((what, "not measured", None))
            return
        met = value >= bound if at_least else value <= bound
        rows.append((what, _times(value, bound), met))

    for sc in ("fanout_small", "fanout_large"):
        title = "N=100" if sc == "fanout_small" else "N=1,000"
        ratio_row(f"fan-out {title} ≥ 1.0× websockets", sc, "per_s", "websockets", 1.0, True)
        ratio_row(f"fan-out {title} ≥ 3.5× python-socketio", sc, "per_s", "socketio", 3.5,
                  True)
    ratio_row("p99 latency ≤ 1.3× websockets", "latency", "p99_ms", "websockets", 1.3, False)
    slow = results.get("slow", {}).get("wsroom")
    if slow:
        relative = _median(slow, "relative")
        rows.append(("one client never reads: the others ≥ 0.95× without it",
                     "not measured" if relative is None else _times(relative, 0.95),
                     None if relative is None else relative >= 0.95))
        runs = [run.get("slow") or {} for run in slow]
        exact = [run.get("close_code") == 3008 and bool(run.get("exactly_once"))
                 for run in runs]
        rows.append(("the slow one is closed 3008 and its resume replays every message "
                     "exactly once", f"{sum(exact)}/{len(exact)} repetitions", all(exact)))
    idle = _median(results.get("idle", {}).get("wsroom"), "kib_per_conn")
    if idle is not None:
        rows.append(("idle memory ≤ 24 KiB/connection", f"{idle:.1f} KiB", idle <= 24))
    big = results.get("idle_10k", {}).get("wsroom")
    if big:
        cpu, rss = _median(big, "cpu_pct"), _median(big, "rss_mib")
        steady = _median(big, "steady_cpu_pct")
        if steady is not None:
            # The heartbeat's cost is the steady window's; the window right after the ramp
            # is shown beside it (it can hold a full collection the ramp left behind).
            ramp = "" if cpu is None else f"; right after the ramp {cpu:.2f}%"
            gcs = _median(big, "full_gcs")
            if gcs is not None:
                ramp += f", {gcs:.0f} full GC in that window"
            rows.append(("10,000 idle: heartbeat CPU < 5% of a core",
                         f"{steady:.2f}% steady{ramp}", steady < 5))
        elif cpu is not None:
            rows.append(("10,000 idle: heartbeat CPU < 5% of a core", f"{cpu:.2f}%", cpu < 5))
        if rss is not None:
            rows.append(("10,000 idle: RSS < 300 MB", f"{rss * 1.048576:.0f} MB ({rss:.0f} MiB)",
                         rss * 1.048576 < 300))
    redis = results.get("redis_fanout", {})
    if redis:
        two = _median(redis.get("wsroom-redis-2w"), "per_s")
        rows.append(("Redis backplane: cross-worker fan-out reported",
                     "not measured" if two is None else f"{two:,.0f} deliveries/s (2 workers)",
                     None if two is None else True))
    if not rows:
        return []
    mark = {True: "met", False: "**not met**", None: "–"}
    lines = ["## Targets", "",
             "The targets set for wsroom (with all its guarantees on), from this run's "
             "medians; the sections below have the detail.", "",
             "| target | this run | |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {mark[met]} |" for what, value, met in rows]
    return [*lines, ""]


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
    lines += targets(results)
    history = Path(__file__).with_name("HISTORY.md")
    if history.exists() and not meta["quick"]:
        lines += [history.read_text().rstrip(), ""]
    drawn = {name for name, (ids, key, ylabel) in PLOTS.items()
             if plot(assets / name, plan, results, ids, key, ylabel)}
    for sc in plan:
        if sc.id not in results:
            continue
        lines += [f"## {sc.title}", "", sc.what, "", *table(sc, results[sc.id]), ""]
        if sc.more is not None:
            heading, text, metrics = sc.more
            lines += [f"### {heading}", "", text, "", *table(sc, results[sc.id], metrics),
                      ""]
        if sc.id == "redis_fanout":
            lines += redis_summary(results[sc.id])
        lines += [f"![{sc.title}]({rel}/{name})\n" for name, (ids, _, _) in PLOTS.items()
                  if name in drawn and ids[-1] == sc.id]
    lines += ["## Versions", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta["versions"].items()]
    lines += ["", f"Run on {meta['date']}, {meta['seconds']:.0f} s; raw results: "
              f"[{rel}/results.json]({rel}/results.json).", ""]
    out.write_text("\n".join(lines))
