"""Real Prometheus and Pushgateway servers on 127.0.0.1 for tests (Debian's prometheus and
prometheus-pushgateway packages; `make test` installs them when missing), and
`scrape_config`: what such a server scrapes for a run on a Ray node (Ray's metrics endpoint, with
the shipped configuration's relabelling, and a Pushgateway)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "monitoring" / "prometheus" / "prometheus.yml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(name: str) -> str:
    """The binary's path; a failure (not a skip) when it is missing: the suite needs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's prometheus and prometheus-pushgateway packages "
                    f"(`make test` does so when run as root)")
    return path


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def _server(args: list[str], ready_url: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(ready_url, process, log)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def pushgateway(workdir: Path) -> Iterator[str]:
    """A Pushgateway on 127.0.0.1; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [require_binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"]
    with _server(args, f"{url}/-/ready", workdir / "pushgateway.log"):
        yield url


class PrometheusServer:
    """A running Prometheus and its HTTP query API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (each item: {"metric": labels, "value": [t, "v"]})."""
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return list(body["data"]["result"])

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            return list(json.load(response)["data"]["activeTargets"])

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns something; the result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(1)


@contextmanager
def prometheus(workdir: Path, config: dict[str, Any]) -> Iterator[PrometheusServer]:
    """A Prometheus server on 127.0.0.1 with ``config`` (a prometheus.yml as a mapping)."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [require_binary("prometheus"), f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"]
    with _server(args, f"{url}/-/ready", workdir / "prometheus.log"):
        yield PrometheusServer(url)


def strip_ray_prefix() -> list[dict[str, Any]]:
    """The relabelling the shipped scrape configuration applies to Ray's endpoints (so that the
    tests check the shipped rule, not a copy of it)."""
    import yaml

    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    for job in config["scrape_configs"]:
        for rule in job.get("metric_relabel_configs", []):
            if "ray_" in str(rule.get("regex", "")) and rule.get("target_label") == "__name__":
                return [rule]
    raise AssertionError(f"{SHIPPED_CONFIG}: no metric_relabel_configs rule strips Ray's ray_ prefix")


def scrape_config(ray_metrics_port: int, gateway_url: str) -> dict[str, Any]:
    """A prometheus.yml (as a mapping) scraping, every second, a Ray node's metrics endpoint on
    127.0.0.1 (the shipped relabelling strips the ray_ prefix) and the Pushgateway at `gateway_url`."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{ray_metrics_port}"]}],
             "metric_relabel_configs": strip_ray_prefix()},
            {"job_name": "pushgateway", "honor_labels": True,
             "static_configs": [{"targets": [gateway_url.removeprefix("http://")]}]},
        ],
    }
