"""L2 honesty: a real 1 s server pause must show in the measured p99 (coordinated omission).

nginx's only worker is frozen with SIGSTOP for ``--pause`` seconds in the middle of each run and
thawed with SIGCONT. The same run without the pause is the baseline. Open-loop (ours, latency from
the intended send time) must see p99 rise >= 10x; closed-loop tools (wrk, and ours in closed-loop
mode) send nothing while they wait, so the stall touches only a few requests and p99 barely moves.

    python benchmarks/loadgen_honesty.py [--reps 3] [--seconds 5] [--rate 1000] [--pause 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from loadgen_headroom import PAYLOAD, RESULTS, Nginx, nginx, spread, wrk

from ml_release.analysis.loadgen import run_closed_loop, run_open_loop


def with_pause(server: Nginx, pause_s: float, at_s: float, run: Callable[[], float]) -> float:
    """Run ``run()`` while freezing nginx's worker from ``at_s`` for ``pause_s`` seconds."""
    pid = server.worker_pid()
    started = threading.Event()

    def freeze() -> None:
        started.wait()
        time.sleep(at_s)  # a benchmark script, not a test: this is the injected fault's timing
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(pause_s)
        finally:
            os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=freeze, daemon=True)
    thread.start()
    started.set()
    try:
        return run()
    finally:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--pause", type=float, default=1.0)
    args = parser.parse_args()
    count = int(args.rate * args.seconds)
    at = args.seconds / 2 - args.pause / 2

    def open_loop(url: str) -> Callable[[], float]:
        def go() -> float:
            result = run_open_loop(url, [PAYLOAD], rate_per_s=args.rate, count=count, keep_bodies=False)
            return result.percentile_ms(99)

        return go

    def closed_loop(url: str) -> Callable[[], float]:
        def go() -> float:
            result = run_closed_loop(url, [PAYLOAD], connections=8, count=10_000_000, max_duration_s=args.seconds)
            return result.percentile_ms(99)

        return go

    def wrk_loop(url: str) -> Callable[[], float]:
        return lambda: wrk(url, args.seconds, connections=8)["p99_ms"]

    tools = {"ours_open_loop": open_loop, "ours_closed_loop": closed_loop, "wrk_closed_loop": wrk_loop}
    p99: dict[str, dict[str, list[float]]] = {t: {"baseline": [], "paused": []} for t in tools}
    with nginx() as server:
        for _ in range(args.reps):
            for tool, make in tools.items():
                p99[tool]["baseline"].append(make(server.url)())
                p99[tool]["paused"].append(with_pause(server, args.pause, at, make(server.url)))
    report: dict[str, Any] = {
        "benchmark": "L2 coordinated omission",
        "endpoint": "nginx 1 worker, return 200 '{}', loopback; worker SIGSTOPped mid-run",
        "seconds": args.seconds,
        "open_loop_rate_per_s": args.rate,
        "pause_s": args.pause,
        "tools": {},
    }
    print(f"{'tool':<20}{'p99 base ms':>14}{'p99 paused ms':>16}{'ratio':>10}{'ratio min':>11}{'ratio max':>11}")
    for tool, runs in p99.items():
        ratios = [p / b for p, b in zip(runs["paused"], runs["baseline"], strict=True)]
        entry = {"baseline_p99_ms": spread(runs["baseline"]), "paused_p99_ms": spread(runs["paused"])}
        entry["ratio"] = spread(ratios)
        report["tools"][tool] = entry
        print(
            f"{tool:<20}{entry['baseline_p99_ms']['median']:>14.2f}{entry['paused_p99_ms']['median']:>16.1f}"
            f"{entry['ratio']['median']:>10.1f}{entry['ratio']['min']:>11.1f}{entry['ratio']['max']:>11.1f}"
        )
    report["meets_L2"] = report["tools"]["ours_open_loop"]["ratio"]["min"] >= 10
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "loadgen_honesty.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"L2 met (open-loop p99 ratio >= 10 in every repetition): {report['meets_L2']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
