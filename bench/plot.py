#!/usr/bin/env python3
"""Plot a bench/run.py result: throughput by workload and peer, and latency percentiles.

    python bench/plot.py bench/results/bench-YYYYmmdd-HHMMSS.json   # writes the .png beside it

Top rows: ops/s (log scale) per workload, one bar per peer, one panel per value
size and client count. Bottom row: p50 (bar) and p99 (whisker) of reads in
workload C and of updates in workload A, per peer, at one client and at the
most clients.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["write_plot"]


def write_plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none wanted
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    p = doc["parameters"]
    peers = [pe["id"] for pe in doc["peers"] if pe["status"] == "measured"]
    if not peers:
        raise ValueError("no measured peer to plot")
    sizes: list[int] = p["value_sizes"]
    clients: list[int] = p["clients"]
    workloads: list[str] = p["workloads"]
    rows = {(r["peer"], r["workload"], r["value_size"], r["clients"]): r for r in doc["results"] if r["status"] == "ok"}
    cmap = plt.get_cmap("tab10")
    colors = {pid: cmap(i % 10) for i, pid in enumerate(peers)}
    power = {pe["id"]: pe["survives_power_loss"] for pe in doc["peers"]}

    ncols = max(len(clients), 2)
    nrows = len(sizes) + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    width = 0.8 / len(peers)
    for r_i, vs in enumerate(sizes):
        for c_i in range(ncols):
            ax = axes[r_i][c_i]
            if c_i >= len(clients):
                ax.axis("off")
                continue
            nc = clients[c_i]
            for k, pid in enumerate(peers):
                xs, ys = [], []
                for w_i, w in enumerate(workloads):
                    row = rows.get((pid, w, vs, nc))
                    if row is not None and row["ops_per_s"] > 0:
                        xs.append(w_i - 0.4 + width * (k + 0.5))
                        ys.append(row["ops_per_s"])
                label = f"{pid}{' (durable)' if power.get(pid) == 'yes' else ''}"
                ax.bar(xs, ys, width=width, color=colors[pid], label=label)
            if not ax.patches:
                _empty(ax, "no measured cell")
                continue
            ax.set_yscale("log")
            ax.set_xticks(range(len(workloads)))
            ax.set_xticklabels(workloads)
            ax.set_title(f"{vs} B values, {nc} client process{'es' if nc > 1 else ''}", fontsize=10)
            ax.set_ylabel("ops/s (log)")
            ax.grid(axis="y", which="both", alpha=0.3)

    lat_panels = [("C", "read", clients[0]), ("A", "update", clients[0])]
    if len(clients) > 1:
        lat_panels.append(("A", "update", clients[-1]))
    vs0 = sizes[0]
    for c_i in range(ncols):
        ax = axes[nrows - 1][c_i]
        if c_i >= len(lat_panels):
            ax.axis("off")
            continue
        w, op, nc = lat_panels[c_i]
        names, p50s, p99s = [], [], []
        for pid in peers:
            row = rows.get((pid, w, vs0, nc))
            o = None if row is None else row["ops"].get(op)
            if o is None:
                continue
            names.append(pid)
            p50s.append(o["p50_us"])
            p99s.append(o["p99_us"])
        if not names:
            _empty(ax, f"no {op} latency for workload {w}, {vs0} B, {nc} client(s)")
            continue
        ys = list(range(len(names)))
        ax.barh(ys, p50s, color=[colors[n] for n in names], label="p50")
        ax.errorbar(
            p99s, ys, xerr=[[max(b - a, 0) for a, b in zip(p50s, p99s)], [0] * len(p99s)],
            fmt="|", color="black", capsize=0, label="p99",
        )  # fmt: skip
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_xlabel("µs (log): bar p50, whisker to p99")
        ax.set_title(f"{op} latency, workload {w}, {vs0} B, {nc} client(s)", fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)

    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            break
    fig.legend(handles, labels, loc="upper center", ncol=min(len(peers), 4), fontsize=9, frameon=False)
    m = doc["machine"]
    fig.text(
        0.5, 0.005,
        f"{doc['date']}  {m['cpu_model']}, {m['nproc']} cores shared by clients and servers; "
        f"{p['record_count']:,} keys, {p['duration_s']} s per cell, YCSB zipfian {p['zipfian_constant']}",
        ha="center", fontsize=8,
    )  # fmt: skip
    height_in = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.25 / height_in, 1, 1 - 0.55 / height_in))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _empty(ax: Any, text: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, transform=ax.transAxes)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    doc = json.loads(src.read_text())
    out = src.with_suffix(".png")
    write_plot(doc, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
