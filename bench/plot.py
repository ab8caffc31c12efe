"""p50 latency against keyspace size, one line per server, from a results.json.

python -m bench.plot [bench/out/results.json] [bench/p50_vs_keys.png]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.report import load_results

LABELS = {
    "baseline": "(a) in-backend baseline (KEYS, sync)",
    "sidecar": "(b) session-sidecar",
    "floor": "(c) floor (one pipelined round trip)",
}
STYLE = {"baseline": ("tab:red", "s"), "sidecar": ("tab:blue", "o"), "floor": ("tab:green", "^")}


def plot_p50(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sizes = sorted(int(s) for s in results["sizes"])
    cfg = results["config"]
    # The work per request, not queueing: the fewest connections measured.
    connections = min(cfg["connections"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name in ("baseline", "sidecar", "floor"):
        xs, ys, lo, hi = [], [], [], []
        for size in sizes:
            entry = results["sizes"][str(size)]["connections"][str(connections)].get(name)
            if entry is None:
                continue
            med = entry["median"]
            xs.append(size)
            ys.append(med["p50_ms"])
            lo.append(med["p50_ms"] - med["p50_ms_min"])
            hi.append(med["p50_ms_max"] - med["p50_ms"])
        if not xs:
            continue
        color, marker = STYLE[name]
        ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3, label=LABELS[name])
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.3g} ms", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s:,}" for s in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("unrelated keys in Redis (plus ~1,700 keys of the 200 conversations)")
    ax.set_ylabel("p50 latency, ms (log)")
    ax.set_title(
        "active-session p50 vs keyspace size\n"
        f"wrk -c{connections}, {cfg['rounds']} rounds x "
        f"{cfg['duration']} s, median (bars: min-max); {results.get('date', '')}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else Path("bench/out/results.json")
    target = Path(args[1]) if len(args) > 1 else Path("bench/p50_vs_keys.png")
    plot_p50(load_results(source), target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
