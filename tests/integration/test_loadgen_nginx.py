"""The load generator against a real nginx on a free loopback port (no TorchServe needed)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_release.analysis import stats
from ml_release.analysis.loadgen import run_open_loop, version_samples
from tests.support.services import free_port, port_open, wait_until

pytestmark = pytest.mark.integration

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HEADER = "X-Served-By"
CANARY_SHARE = 0.2
BODY = '{"label":"positive","scores":{"negative":0.1,"neutral":0.2,"positive":0.7}}'

CONFIG = """
worker_processes 1;
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {home}/body;
  proxy_temp_path {home}/proxy;
  fastcgi_temp_path {home}/fastcgi;
  uwsgi_temp_path {home}/uwsgi;
  scgi_temp_path {home}/scgi;
  split_clients "${{request_id}}" $served_by {{ {share}% "v2"; * "v1"; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      add_header {header} $served_by always;
      return 200 '{body}';
    }}
  }}
}}
"""


@pytest.fixture(scope="module")
def nginx_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (Debian package nginx)")
    home = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = home / "nginx.conf"
    conf.write_text(
        CONFIG.format(home=home, port=port, share=CANARY_SHARE * 100, header=HEADER, body=BODY), encoding="utf-8"
    )
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-e", str(home / "error.log")])
    try:
        wait_until(lambda: port_open(port), 10, f"nginx on port {port}")
        yield f"http://127.0.0.1:{port}/predictions/tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_open_loop_keeps_its_arrival_rate_and_attributes_each_response(nginx_url: str) -> None:
    rate, count = 400.0, 1000
    result = run_open_loop(nginx_url, [{"text": "hi"}], rate_per_s=rate, count=count, version_header=HEADER)
    assert result.count == count and result.errors == 0
    # the schedule is the schedule: request i left close to i / rate
    assert result.send_lag_p99_ms < 50
    assert result.summary()["achieved_rate_per_s"] == pytest.approx(rate, rel=0.05)
    counts = {v: s["requests"] for v, s in result.by_version().items()}
    assert set(counts) == {"v1", "v2"}
    tolerance = stats.share_matches_weight(counts["v2"], count, CANARY_SHARE)
    assert tolerance.p_value >= 0.001, (counts, tolerance.details)


def test_version_samples_give_the_judge_labels_latencies_and_statuses(nginx_url: str) -> None:
    result = run_open_loop(nginx_url, [{"text": "hi"}], rate_per_s=200, count=200, version_header=HEADER)
    canary = version_samples(result, "v2")
    stable = version_samples(result, "v1")
    assert canary.requests + stable.requests == 200
    assert set(canary.predicted_labels) == {"positive"} and canary.non_finite_responses == 0
    assert len(canary.latencies_ms) == canary.requests
    assert result.histogram("v2", all_versions=False).get_total_count() == canary.requests


def test_a_dead_endpoint_gives_status_zero_samples_within_the_deadline() -> None:
    url = f"http://127.0.0.1:{free_port()}/predictions/tiny"
    result = run_open_loop(url, [{"text": "hi"}], rate_per_s=200, count=100, timeout_s=1.0)
    assert result.count == 100
    assert all(s.status == 0 for s in result.samples)
    assert result.error_rate == 1.0
    assert result.wall_s < 5


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1:8080/predictions/m", "https://127.0.0.1/predictions/m", "http://example.com/"],
    ids=["private-address", "https", "hostname"],
)
def test_only_plain_http_to_loopback_is_accepted(url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        run_open_loop(url, [{}], rate_per_s=1, count=1)
