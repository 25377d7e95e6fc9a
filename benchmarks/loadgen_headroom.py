"""L1 headroom: the load generator's maximum request rate on a trivial local endpoint.

Reported as ratios measured side by side in one run (PERFORMANCE.md): ours ÷ ``wrk`` on the same
nginx ``return 200 '{}'`` endpoint, and ours ÷ TorchServe's saturated rate (measured here with the
tiny test model when ``--start-torchserve`` is given, else taken from ``--torchserve-rate``).

    python benchmarks/loadgen_headroom.py [--reps 3] [--seconds 3] [--torchserve-rate R | --start-torchserve]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "include"), str(ROOT)]

from ml_release.analysis.loadgen import run_closed_loop, run_open_loop  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
PAYLOAD = {"text": "I love this car"}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {home}/body;
  proxy_temp_path {home}/proxy;
  fastcgi_temp_path {home}/fastcgi;
  uwsgi_temp_path {home}/uwsgi;
  scgi_temp_path {home}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{{}}'; }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Nginx:
    """An nginx with one worker on a free loopback port, from a temporary config."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        conf = home / "nginx.conf"
        conf.write_text(NGINX_CONF.format(home=home, port=self.port), encoding="utf-8")
        self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-e", str(home / "error.log")])
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("nginx did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/predictions/bench"

    def worker_pid(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0])

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def nginx() -> Iterator[Nginx]:
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        server = Nginx(Path(tmp))
        try:
            yield server
        finally:
            server.close()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk(url: str, seconds: float, connections: int = 32, threads: int = 1) -> dict[str, float]:
    """Run wrk (closed loop, POSTing the same JSON) and return its rate and latency percentiles."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        body = json.dumps(PAYLOAD).replace('"', '\\"')
        script.write(f'wrk.method = "POST"\nwrk.body = "{body}"\nwrk.headers["Content-Type"] = "application/json"\n')
    try:
        out = subprocess.run(
            [
                WRK,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
    finally:
        os.unlink(script.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {}
    for q, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        pct[f"p{q}_ms"] = float(value) * _UNITS[unit]
    return {"rate_per_s": rate, **pct}


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": [round(v, 3) for v in values],
    }


def ours_open(url: str, seconds: float, workers: int) -> float:
    """Completed requests per second when the schedule asks for far more than can be sent."""
    target = 200_000.0
    result = run_open_loop(
        url, [PAYLOAD], rate_per_s=target, count=int(40_000 * seconds), max_in_flight=32,
        keep_bodies=False, workers=workers, timeout_s=5.0,
    )  # fmt: skip
    assert result.errors == 0, result.summary()
    return result.count / result.wall_s


def ours_closed(url: str, seconds: float, workers: int) -> float:
    result = run_closed_loop(url, [PAYLOAD], connections=32, count=int(40_000 * seconds), workers=workers)
    assert result.errors == 0, result.summary()
    return result.count / result.wall_s


def torchserve_saturated_rate(seconds: float) -> float:
    """Start TorchServe with the tiny test model and drive it closed-loop to saturation."""
    from ml_release.config import ServingSpec
    from ml_release.packaging.archiver import build_archive
    from ml_release.serving import local
    from ml_release.serving.local import LocalTorchServeSettings
    from ml_release.serving.torchserve import TorchServeClient
    from ml_release.training.model import tiny_classifier

    serving = ServingSpec(batch_size=4, max_batch_delay_ms=5, workers=1, response_timeout_s=30, torch_threads=1)
    with tempfile.TemporaryDirectory(prefix="bench-torchserve-") as tmp:
        base = Path(tmp)
        settings = LocalTorchServeSettings(
            home=base / "home", model_store=base / "store", log_dir=base / "logs",
            inference_port=free_port(), management_port=free_port(), metrics_port=free_port(),
            grpc_inference_port=free_port(), grpc_management_port=free_port(),  # beside a running stack
        )  # fmt: skip
        config = local.start(settings, timeout_s=180)
        try:
            deadline = time.monotonic() + 60  # /ping is the inference port; management may come later
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", settings.management_port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("TorchServe's management API did not open")
                time.sleep(0.2)
            model, tokenizer = tiny_classifier(("negative", "neutral", "positive"))
            model.save_pretrained(base / "model")
            tokenizer.save_pretrained(base / "model")
            mar = build_archive(base / "model", "tiny", "v1", serving, settings.model_store, max_length=32)
            with TorchServeClient(config) as client:
                client.register(mar.name, "tiny", timeout_s=180)
                client.wait_ready("tiny", "v1", timeout_s=180)
            url = f"{config.inference_url.rstrip('/')}/predictions/tiny"
            headers = {"Authorization": f"Bearer {config.inference_token}"}
            run_closed_loop(url, [PAYLOAD], connections=16, count=200, headers=headers)  # warm-up
            rates = []
            for _ in range(3):
                started = time.perf_counter()
                result = run_closed_loop(
                    url, [PAYLOAD], connections=16, count=100_000, headers=headers, max_duration_s=seconds
                )
                ok = sum(1 for s in result.samples if s.ok)
                rates.append(ok / (time.perf_counter() - started))
            return statistics.median(rates)
        finally:
            local.stop(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=1, help="load generator processes (wrk gets as many threads)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--torchserve-rate", type=float, help="TorchServe's saturated rate, measured elsewhere")
    group.add_argument("--start-torchserve", action="store_true", help="measure it here with the tiny test model")
    args = parser.parse_args()

    runs: dict[str, list[float]] = {"wrk": [], "ours_open": [], "ours_closed": []}
    with nginx() as server:
        wrk(server.url, 1)  # warm-up
        for _ in range(args.reps):
            runs["wrk"].append(wrk(server.url, args.seconds, threads=args.workers)["rate_per_s"])
            runs["ours_open"].append(ours_open(server.url, args.seconds, args.workers))
            runs["ours_closed"].append(ours_closed(server.url, args.seconds, args.workers))
    ratio_wrk = [o / w for o, w in zip(runs["ours_open"], runs["wrk"], strict=True)]
    ts_rate, ts_source = args.torchserve_rate, "argument"
    if args.start_torchserve:
        ts_rate, ts_source = torchserve_saturated_rate(args.seconds * 2), "measured (tiny model, 1 worker)"
    report: dict[str, Any] = {
        "benchmark": "L1 load generator headroom",
        "endpoint": "nginx 1 worker, return 200 '{}', loopback",
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "rate_per_s": {k: spread(v) for k, v in runs.items()},
        "ratio_to_wrk": spread(ratio_wrk),
        "torchserve_rate_per_s": ts_rate,
        "torchserve_rate_source": ts_source if ts_rate else None,
    }
    if ts_rate:
        report["ratio_to_torchserve"] = spread([o / ts_rate for o in runs["ours_open"]])
        report["meets_L1"] = report["ratio_to_torchserve"]["min"] >= 10
    print(f"{'measure':<28}{'median':>12}{'min':>12}{'max':>12}")
    for name, v in [
        *((f"{k} req/s", report["rate_per_s"][k]) for k in runs),
        ("ours_open / wrk", report["ratio_to_wrk"]),
    ]:
        print(f"{name:<28}{v['median']:>12.2f}{v['min']:>12.2f}{v['max']:>12.2f}")
    if ts_rate:
        r = report["ratio_to_torchserve"]
        print(f"{'TorchServe req/s':<28}{ts_rate:>12.1f}   ({ts_source})")
        print(f"{'ours_open / TorchServe':<28}{r['median']:>12.1f}{r['min']:>12.1f}{r['max']:>12.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "loadgen_headroom.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
