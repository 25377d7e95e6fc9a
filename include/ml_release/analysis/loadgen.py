"""An open-loop load generator: requests leave on a fixed schedule, whatever the server does.

A closed-loop tool waits for each answer before sending the next request, so a server that
stalls also slows the sender and the stall vanishes from the figures (coordinated omission).
Here request ``i`` is due at ``t0 + i / rate`` and its latency is measured from that intended
time, so a stall shows up in every request that should have been sent during it (PERFORMANCE L2).

The generator must never be the bottleneck (PERFORMANCE L1), so it does not use a general HTTP
client: it speaks just enough HTTP/1.1 over asyncio protocols (uvloop when installed) with
keep-alive connections, keeps the hot path to byte slicing, and parses bodies only after the run.
``workers > 1`` splits the schedule across processes that share one ``t0`` (``perf_counter`` is
``CLOCK_MONOTONIC``, one clock for every process on Linux). Each sample also records when it was
actually sent, so :attr:`LoadResult.send_lag_p99_ms` says whether the generator kept up.

It targets loopback addresses only: it is a measuring instrument for the local stack, not a tool
to point at other people's servers. Every scheduled request ends as a sample: one that could not
be sent or answered before the run's hard deadline is a status-0 sample, never silently dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram

    from ml_release.analysis.judge import VersionSamples

DEFAULT_VERSION_HEADER = "X-ML-Release-Model-Version"  # set by ml_release.packaging.handler
HDR_MAX_US = 3_600_000_000  # one hour in microseconds; HDR needs a highest trackable value
HDR_SIGNIFICANT_DIGITS = 3
_CLOCK: Callable[[], float] = time.perf_counter


@dataclasses.dataclass(frozen=True)
class Sample:
    index: int  # position in the schedule; payload ``index % len(payloads)``
    intended_s: float  # seconds after t0 the request was due
    latency_s: float  # from the intended send time to the last byte of the answer
    status: int  # HTTP status, or 0 for a transport error / timeout / never sent before the deadline
    served_by: str | None
    body: Any = None
    sent_s: float = math.nan  # seconds after t0 the request actually left (nan: never sent)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclasses.dataclass(frozen=True)
class LoadResult:
    samples: tuple[Sample, ...]
    rate_per_s: float
    wall_s: float
    version_header: str | None = None
    workers: int = 1
    mode: str = "open"

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if not s.ok)

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else math.nan

    def latencies_ms(self, version: str | None = None, *, all_versions: bool = True) -> list[float]:
        """Latencies in ms, failed requests included; only ``version``'s when given."""
        if version is None and all_versions:
            return [s.latency_s * 1000.0 for s in self.samples]
        return [s.latency_s * 1000.0 for s in self.samples if s.served_by == version]

    def percentile_ms(self, q: float) -> float:
        """Latency percentile over every request, failed ones included (they cost the caller too)."""
        import numpy as np

        if not self.samples:
            return math.nan
        return float(np.percentile([s.latency_s for s in self.samples], q) * 1000.0)

    def histogram(self, version: str | None = None, *, all_versions: bool = True) -> HdrHistogram:
        """An HDR histogram (microseconds, 3 significant digits) of the latencies."""
        from hdrh.histogram import HdrHistogram

        hist = HdrHistogram(1, HDR_MAX_US, HDR_SIGNIFICANT_DIGITS)
        for ms in self.latencies_ms(version, all_versions=all_versions):
            hist.record_value(min(HDR_MAX_US, max(1, round(ms * 1000.0))))
        return hist

    @property
    def send_lag_p99_ms(self) -> float:
        """p99 of (actual send - intended send) over sent requests: the generator's own lateness.

        Lag also grows when every connection is busy (``max_in_flight``); either way a large lag
        means the offered load was not the scheduled one.
        """
        import numpy as np

        lags = [s.sent_s - s.intended_s for s in self.samples if math.isfinite(s.sent_s)]
        return float(np.percentile(lags, 99) * 1000.0) if lags else math.nan

    def by_version(self) -> dict[str, dict[str, Any]]:
        """Per serving version (the ``version_header`` value; ``"unattributed"`` when absent)."""
        groups: dict[str, list[Sample]] = collections.defaultdict(list)
        for s in self.samples:
            groups[s.served_by if s.served_by is not None else "unattributed"].append(s)
        out = {}
        for version, group in sorted(groups.items()):
            hist = LoadResult(tuple(group), self.rate_per_s, self.wall_s).histogram()
            errors = sum(1 for s in group if not s.ok)
            out[version] = {
                "requests": len(group),
                "errors": errors,
                "error_rate": errors / len(group),
                "p50_ms": hist.get_value_at_percentile(50) / 1000.0,
                "p99_ms": hist.get_value_at_percentile(99) / 1000.0,
                "max_ms": hist.get_max_value() / 1000.0,
            }
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p50_ms": self.percentile_ms(50),
            "p95_ms": self.percentile_ms(95),
            "p99_ms": self.percentile_ms(99),
            "max_ms": self.percentile_ms(100),
            "target_rate_per_s": self.rate_per_s,
            "achieved_rate_per_s": self.count / self.wall_s if self.wall_s else math.nan,
            "wall_s": self.wall_s,
            "send_lag_p99_ms": self.send_lag_p99_ms,
            "workers": self.workers,
            "mode": self.mode,
            "by_version": self.by_version() if self.version_header else {},
        }


def version_samples(
    result: LoadResult, version: str, *, label_key: str = "label", scores_key: str = "scores"
) -> VersionSamples:
    """The judge's view of the requests ``version`` served (needs ``keep_bodies=True`` for labels).

    A 2xx body whose ``scores`` hold a NaN or an infinity counts as a non-finite response, not a
    label: the judge fails the canary on any of them.
    """
    from ml_release.analysis.judge import VersionSamples

    mine = [s for s in result.samples if s.served_by == version]
    labels: list[str] = []
    non_finite = 0
    for s in mine:
        if not s.ok or not isinstance(s.body, dict):
            continue
        scores = s.body.get(scores_key)
        values = list(scores.values()) if isinstance(scores, dict) else scores if isinstance(scores, list) else []
        if any(not isinstance(v, int | float) or not math.isfinite(v) for v in values):
            non_finite += 1
        elif isinstance(s.body.get(label_key), str):
            labels.append(s.body[label_key])
    return VersionSamples(
        version=version,
        latencies_ms=tuple(s.latency_s * 1000.0 for s in mine),
        statuses=tuple(s.status for s in mine),
        predicted_labels=tuple(labels),
        non_finite_responses=non_finite,
    )


def run_open_loop(
    url: str,
    payloads: Sequence[Any],
    rate_per_s: float,
    count: int,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
    max_in_flight: int = 256,
    version_header: str | None = None,
    *,
    workers: int = 1,
    keep_bodies: bool = True,
    max_duration_s: float | None = None,
) -> LoadResult:
    """POST ``count`` JSON payloads (cycled) to ``url`` at ``rate_per_s``, open-loop.

    ``max_in_flight`` bounds open connections per worker; requests due while all are busy wait in
    a queue, and their latency still counts from their intended time. The run ends by
    ``max_duration_s`` (default: the schedule's length plus twice ``timeout_s``); whatever has not
    been answered by then is a status-0 sample.
    """
    return _run(
        url, payloads, "open", rate_per_s, count, headers, timeout_s, max_in_flight, version_header,
        workers, keep_bodies, max_duration_s,
    )  # fmt: skip


def run_closed_loop(
    url: str,
    payloads: Sequence[Any],
    connections: int,
    count: int,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
    version_header: str | None = None,
    *,
    workers: int = 1,
    keep_bodies: bool = False,
    max_duration_s: float = 60.0,
) -> LoadResult:
    """``connections`` loops that each send the next request when the previous answer arrives.

    Latency runs from the actual send. This is how most tools measure, and it hides server stalls
    (coordinated omission); it exists to show that, and to measure maximum throughput.
    """
    return _run(
        url, payloads, "closed", 0.0, count, headers, timeout_s, connections, version_header,
        workers, keep_bodies, max_duration_s,
    )  # fmt: skip


# -- implementation ---------------------------------------------------------------------------

# (index, intended_s, sent_s, done_s, status, served_by, body) relative to t0
_Raw = tuple[int, float, float, float, int, "str | None", "bytes | str | None"]


@dataclasses.dataclass(frozen=True)
class _Job:
    host: str
    port: int
    requests: tuple[bytes, ...]
    mode: str
    rate: float
    count: int
    timeout_s: float
    max_conns: int
    version_header: bytes | None
    keep_bodies: bool
    max_duration_s: float
    worker: int
    workers: int


def _target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"load generator speaks plain http to loopback only, not {url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"load generator targets loopback addresses only, not {host!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, parts.port or 80, path


def _request_bytes(host: str, port: int, path: str, payload: Any, headers: dict[str, str]) -> bytes:
    body = json.dumps(payload).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _run(
    url: str,
    payloads: Sequence[Any],
    mode: str,
    rate: float,
    count: int,
    headers: dict[str, str] | None,
    timeout_s: float,
    max_conns: int,
    version_header: str | None,
    workers: int,
    keep_bodies: bool,
    max_duration_s: float | None,
) -> LoadResult:
    host, port, path = _target(url)
    if count <= 0 or not payloads or (mode == "open" and rate <= 0) or max_conns <= 0:
        return LoadResult((), rate, 0.0, version_header, workers, mode)
    if max_duration_s is None:
        max_duration_s = (count - 1) / rate + 2 * timeout_s if mode == "open" else 60.0
    workers = max(1, min(workers, count))
    requests = tuple(_request_bytes(host, port, path, p, headers or {}) for p in payloads)
    jobs = [
        _Job(
            host, port, requests, mode, rate, count, timeout_s, max(1, max_conns // workers if mode == "closed"
            else max_conns), version_header.lower().encode() if version_header else None, keep_bodies,
            max_duration_s, w, workers,
        )
        for w in range(workers)
    ]  # fmt: skip
    if workers == 1:
        raw, wall = _run_worker(jobs[0], _CLOCK() + 0.005)
    else:
        raw, wall = _run_processes(jobs)
    samples = tuple(sorted((_to_sample(r, keep_bodies) for r in raw), key=lambda s: s.index))
    return LoadResult(samples, rate, wall, version_header, workers, mode)


def _to_sample(r: _Raw, keep_bodies: bool) -> Sample:
    index, intended, sent, done, status, served_by, raw_body = r
    body: Any = None
    if isinstance(raw_body, bytes) and keep_bodies:
        try:
            body = json.loads(raw_body)
        except ValueError:
            body = raw_body[:200].decode(errors="replace")
    elif isinstance(raw_body, str):
        body = raw_body
    return Sample(index, intended, done - intended, status, served_by, body, sent)


def _run_processes(jobs: list[_Job]) -> tuple[list[_Raw], float]:
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent (Airflow, pytest)
    pipes, procs = [], []
    for job in jobs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(job, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for pipe in pipes:
            try:
                ready = pipe.poll(60) and pipe.recv() == "ready"
            except EOFError:
                ready = False
            if not ready:
                raise RuntimeError("load generator worker did not start (is __main__ importable for spawn?)")
        t0 = _CLOCK() + 0.02
        for pipe in pipes:
            pipe.send(t0)
        raw: list[_Raw] = []
        wall = 0.0
        budget = jobs[0].max_duration_s + 60
        for pipe in pipes:
            if not pipe.poll(budget):
                raise RuntimeError("load generator worker did not report")
            part, part_wall = pipe.recv()
            raw.extend(part)
            wall = max(wall, part_wall)
        return raw, wall
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def _worker_main(job: _Job, pipe: Any) -> None:
    pipe.send("ready")
    t0 = pipe.recv()
    pipe.send(_run_worker(job, t0))


def _run_worker(job: _Job, t0: float) -> tuple[list[_Raw], float]:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_Worker(job, t0).run())


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.job: tuple[int, float, float] | None = None  # (index, intended_s, sent_s)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, index: int, intended: float) -> None:
        assert self.transport is not None
        self.job = (index, intended, _CLOCK() - self.worker.t0)
        self.buf.clear()
        self.transport.write(self.worker.requests[index % len(self.worker.requests)])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.job is None:
            return
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        body_start = head_end + 4
        length = -1
        chunked = False
        keep_alive = True
        served_by: str | None = None
        for line in bytes(self.buf[:head_end]).split(b"\r\n")[1:]:
            raw_name, _, value = line.partition(b":")
            name = raw_name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                keep_alive = False
            elif name == self.worker.version_header:
                served_by = value.strip().decode("latin-1")
        if chunked:
            body = _dechunk(self.buf, body_start)
            if body is None:
                return
        elif length >= 0:
            if len(self.buf) < body_start + length:
                return
            body = bytes(self.buf[body_start : body_start + length])
        else:
            return  # body until close: finished in connection_lost
        status = int(self.buf[9:12])
        self._finish(status, served_by, body)
        if not keep_alive:
            self.close()
        else:
            self.worker.idle(self)

    def _finish(self, status: int, served_by: str | None, body: bytes | str | None) -> None:
        assert self.job is not None
        index, intended, sent = self.job
        self.job = None
        self.worker.record(index, intended, sent, status, served_by, body)

    def fail(self, why: str) -> None:
        if self.job is not None:
            self._finish(0, None, why)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.worker.forget(self)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.job is not None:
            self._finish(0, None, f"connection lost: {exc!r}" if exc else "connection closed by server")
        self.close()


def _dechunk(buf: bytearray, pos: int) -> bytes | None:
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            return bytes(out) if buf.find(b"\r\n", pos) >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class _Worker:
    def __init__(self, job: _Job, t0: float) -> None:
        self.job = job
        self.t0 = t0
        self.requests = job.requests
        self.version_header = job.version_header
        self.results: list[_Raw] = []
        self.idle_conns: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.connecting = 0
        self.backlog: collections.deque[tuple[int, float]] = collections.deque()
        self.my_count = len(range(job.worker, job.count, job.workers))
        self.done = asyncio.Event()
        self.next_closed = job.worker  # closed loop: next index to hand out

    def record(self, index: int, intended: float, sent: float, status: int, served_by: str | None, body: Any) -> None:
        done = _CLOCK() - self.t0
        if not self.job.keep_bodies and isinstance(body, bytes):
            body = None
        if self.job.mode == "closed":
            intended = sent  # closed loop measures from the actual send: that is the point
        self.results.append((index, intended, sent, done, status, served_by, body))
        if len(self.results) >= self.my_count:
            self.done.set()

    def idle(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        nxt = self._next()
        if nxt is not None:
            self.busy.add(conn)
            conn.send(*nxt)
        else:
            self.idle_conns.append(conn)

    def forget(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        if conn in self.idle_conns:
            self.idle_conns.remove(conn)
        if not self.done.is_set() and (self.backlog or self.job.mode == "closed"):
            self._open()

    def _next(self) -> tuple[int, float] | None:
        if self.job.mode == "closed":
            if self.next_closed >= self.job.count or self.done.is_set():
                return None
            i = self.next_closed
            self.next_closed += self.job.workers
            return i, _CLOCK() - self.t0
        return self.backlog.popleft() if self.backlog else None

    def dispatch(self, index: int, intended: float) -> None:
        if self.idle_conns:
            conn = self.idle_conns.pop()
            self.busy.add(conn)
            conn.send(index, intended)
            return
        self.backlog.append((index, intended))
        self._open()

    def _open(self) -> None:
        if len(self.busy) + len(self.idle_conns) + self.connecting < self.job.max_conns:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self), self.job.host, self.job.port)
        except OSError as exc:
            self.connecting -= 1
            nxt = self._next()
            if nxt is not None:
                now = _CLOCK() - self.t0
                self.results.append((nxt[0], nxt[1], now, now, 0, None, f"connect failed: {exc!r}"))
                if len(self.results) >= self.my_count:
                    self.done.set()
                # retry for the rest of the backlog, after a pause so a dead server is not hammered
                await asyncio.sleep(0.01)
                if not self.done.is_set():
                    self._open()
            return
        self.connecting -= 1
        self.idle(conn)

    async def _watchdog(self) -> None:
        while not self.done.is_set():
            now = _CLOCK() - self.t0
            for conn in list(self.busy):
                if conn.job is not None and now - conn.job[2] > self.job.timeout_s:
                    conn.fail(f"timeout after {self.job.timeout_s}s")
            await asyncio.sleep(min(0.05, self.job.timeout_s / 4))

    async def run(self) -> tuple[list[_Raw], float]:
        job = self.job
        watchdog = asyncio.get_running_loop().create_task(self._watchdog())
        delay = self.t0 - _CLOCK()
        if delay > 0:
            await asyncio.sleep(delay)
        if job.mode == "closed":
            for _ in range(min(job.max_conns, self.my_count)):
                self._open()
        else:
            step = job.workers / job.rate
            i = job.worker
            while i < job.count:
                now = _CLOCK() - self.t0
                due = i / job.rate
                while due <= now and i < job.count:
                    self.dispatch(i, due)
                    i += job.workers
                    due = i / job.rate
                if i < job.count:
                    await asyncio.sleep(max(0.0, min(due - now, step)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout=max(0.0, self.t0 + job.max_duration_s - _CLOCK()))
        watchdog.cancel()
        end = _CLOCK() - self.t0
        for conn in list(self.busy):
            conn.fail("run deadline reached")
        for conn in list(self.idle_conns):
            conn.close()
        if job.mode == "open":
            seen = {r[0] for r in self.results}
            for i in range(job.worker, job.count, job.workers):
                if i not in seen:  # stuck in the backlog or never connected before the deadline
                    self.results.append((i, i / job.rate, math.nan, end, 0, None, "not sent before the deadline"))
        return self.results, end
