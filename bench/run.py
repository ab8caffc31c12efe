"""The benchmark: three servers side by side on one real Redis, interleaved.

    python -m bench.run [--sizes 10000,1000000] [--connections 4,64] [--duration 10] [--rounds 3]

For each keyspace size: FLUSHALL, fill (runs through the backend simulator +
N unrelated keys), start the three servers on free loopback ports, check
their answers, warm them up, then `--rounds` rounds in which each server in
turn gets `--duration` seconds of wrk load at each concurrency of
`--connections` (the order of the servers and of the concurrencies rotates
every round) over the ~200 conversation paths with a valid token. Around every
load run it waits for Redis to go quiet and takes `INFO commandstats` / `INFO cpu`
deltas. The medians over rounds are printed, written to
`{out}/results.json` and `{out}/results.md`, and plotted (p50 against
keyspace size, at the fewest connections) to `--plot` (default
`bench/p50_vs_keys.png`). `--record` also rewrites the generated part of
`bench/RESULTS.md`.

bench/harness.py starts Redis, the servers and wrk; bench/measure.py runs the
rounds and computes the figures; bench/report.py renders them. See
bench/README.md for what is measured and why.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness import BENCH_DIR, SERVER_ORDER
from bench.measure import compute_targets, run
from bench.report import load_results, write_outputs


def connection_counts(text: str) -> list[int]:
    counts = list(dict.fromkeys(int(c) for c in text.split(",") if c.strip()))
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not a list of connection counts: {text!r}")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,1000000", help="unrelated keys per run, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per server per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size (median taken)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per server and size")
    p.add_argument(
        "--connections", type=connection_counts, default="4,64",
        help="wrk connections, comma-separated: every server is measured at each, in every round",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--wrk-timeout", type=int, default=10, help="wrk per-request timeout, seconds")
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--servers", default=",".join(SERVER_ORDER), help="subset of baseline,sidecar,floor")
    p.add_argument(
        "--sidecar-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for the sidecar, e.g. SIDECAR_INDEX_MODE=index (repeatable)",
    )  # fmt: skip
    p.add_argument("--check-sample", type=int, default=20, help="conversations asked once before load")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    p.add_argument("--plot", default=str(BENCH_DIR / "p50_vs_keys.png"), help="PNG path ('' for none)")
    p.add_argument("--record", action="store_true", help="also rewrite the generated block of RESULTS.md")
    p.add_argument("--from-json", type=Path, help="re-render the outputs of a results.json; no load")
    p.add_argument(
        "--cluster", action="store_true",
        help="every server on a 3-primary Redis Cluster (bench/cluster_redis.py); "
        "outputs in bench/out/cluster, no plot, no --record, unless --out/--plot are given",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.cluster and args.record:
        p.error("--record rewrites RESULTS.md's single-server block: not with --cluster")
    if args.cluster and "--out" not in (argv or sys.argv):
        args.out = BENCH_DIR / "out" / "cluster"
    if args.cluster and "--plot" not in (argv or sys.argv):
        args.plot = ""
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plot_path = Path(args.plot) if args.plot else None
    if args.from_json:
        results = load_results(args.from_json)
    elif shutil.which("wrk") is None:
        print("bench: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    else:
        command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        results = run(args, command)
    results["targets"] = compute_targets(results)
    write_outputs(results, args.out, plot_path, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
