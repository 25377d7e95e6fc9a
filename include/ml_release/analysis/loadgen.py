"""An open-loop load generator: requests leave on a fixed schedule, whatever the server does.

A closed-loop tool waits for each answer before sending the next request, so a server that
stalls also slows the sender and the stall vanishes from the figures (coordinated omission).
Here request ``i`` is due at ``t0 + i / rate`` and its latency is measured from that intended
time, so a stall shows up in every request that should have been sent during it (PERFORMANCE L2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sample:
    index: int  # position in the schedule; payload ``index % len(payloads)``
    intended_s: float  # seconds after t0 the request was due
    latency_s: float  # from the intended send time to the last byte of the answer
    status: int  # HTTP status, or 0 for a transport error / timeout
    served_by: str | None
    body: Any = None


@dataclasses.dataclass(frozen=True)
class LoadResult:
    samples: tuple[Sample, ...]
    rate_per_s: float
    wall_s: float

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if not 200 <= s.status < 300)

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else math.nan

    def percentile_ms(self, q: float) -> float:
        """Latency percentile over every request, failed ones included (they cost the caller too)."""
        import numpy as np

        if not self.samples:
            return math.nan
        return float(np.percentile([s.latency_s for s in self.samples], q) * 1000.0)

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
        }


def run_open_loop(
    url: str,
    payloads: Sequence[Any],
    rate_per_s: float,
    count: int,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
    max_in_flight: int = 256,
    version_header: str | None = None,
) -> LoadResult:
    """POST ``count`` JSON payloads (cycled) to ``url`` at ``rate_per_s``, open-loop."""
    return asyncio.run(_run(url, payloads, rate_per_s, count, headers or {}, timeout_s, max_in_flight, version_header))


async def _run(
    url: str,
    payloads: Sequence[Any],
    rate: float,
    count: int,
    headers: dict[str, str],
    timeout_s: float,
    max_in_flight: int,
    version_header: str | None,
) -> LoadResult:
    import aiohttp

    if rate <= 0 or count <= 0 or not payloads:
        return LoadResult((), rate, 0.0)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    samples: list[Sample] = []
    clock: Callable[[], float] = time.perf_counter
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        t0 = clock()

        async def one(i: int) -> None:
            due = i / rate
            status, served_by, body = 0, None, None
            try:
                async with session.post(url, json=payloads[i % len(payloads)]) as resp:
                    raw = await resp.read()
                    status = resp.status
                    served_by = resp.headers.get(version_header) if version_header else None
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw[:200].decode(errors="replace")
            except (TimeoutError, aiohttp.ClientError) as exc:
                body = f"{type(exc).__name__}: {exc}"
            samples.append(Sample(i, due, clock() - t0 - due, status, served_by, body))

        tasks = []
        for i in range(count):
            delay = t0 + i / rate - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        wall = clock() - t0
    samples.sort(key=lambda s: s.index)
    return LoadResult(tuple(samples), rate, wall)
