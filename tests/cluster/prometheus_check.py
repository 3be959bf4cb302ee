"""A real Prometheus server (Debian's `prometheus` package) scraping a running cluster, evaluating
every query of the Grafana dashboard (helm/trisect/dashboards/trisect-dashboard.json).

The package is installed by the project's set-up when missing — `make test` runs this module first
(`python -m tests.cluster.prometheus_check`), and the test itself tries again: apt-get as root or
through passwordless sudo (CI, a fresh Debian box), with a policy-rc.d that keeps the package's
own service from starting in the background. Without it, on CI (`CI=true`) the check fails;
elsewhere it is skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.cluster.conftest import free_port

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "trisect" / "dashboards" / "trisect-dashboard.json"
WINDOW = "1m"          # Grafana's $__rate_interval, for the server here (scrapes every 2 s)


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", WINDOW) for p in panels for t in p.get("targets", [])]


def _apt_install() -> None:
    """apt-get install prometheus, as root or through passwordless sudo; nothing otherwise."""
    if not shutil.which("apt-get"):
        return
    sudo: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo") or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode:
            return
        sudo = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:                                  # the package's service must not start (nor linger)
        subprocess.run([*sudo, "sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {policy} && chmod 755 {policy}"],
                       check=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        cmd = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
            # a fresh box has no package lists yet
            subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
    finally:
        if own_policy:
            subprocess.run([*sudo, "rm", "-f", str(policy)])


def prometheus_binary() -> str | None:
    if not shutil.which("prometheus"):
        _apt_install()
    return shutil.which("prometheus")


class PrometheusServer:
    """A Prometheus server scraping `target_url` every 2 s from construction until `close()`.
    `dashboard_results()` evaluates every dashboard query and asserts each returns a number; without
    the binary it fails on CI and skips elsewhere (everything checked before it has passed)."""

    def __init__(self, target_url: str):
        self.binary, self.proc, self.work = prometheus_binary(), None, None
        if self.binary is None:
            return
        target = target_url.split("//", 1)[1].split("/", 1)[0]
        self.work = tempfile.mkdtemp(prefix="prom")
        config = Path(self.work, "prometheus.yml")
        # every 2 s, allowing 2 s: Ray's export answers slowly on a loaded 2-core box, and a failed
        # scrape marks every series stale until the next one
        config.write_text("global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 2s}\n"
                          f"scrape_configs:\n- job_name: ray\n  static_configs: [{{targets: ['{target}']}}]\n")
        port = free_port()
        with open(Path(self.work, "log"), "w") as log:
            self.proc = subprocess.Popen([self.binary, f"--config.file={config}",
                                          f"--storage.tsdb.path={self.work}/data",
                                          f"--web.listen-address=127.0.0.1:{port}"],
                                         stdout=subprocess.DEVNULL, stderr=log)
        self.api = f"http://127.0.0.1:{port}/api/v1"

    def query(self, query: str) -> list[float] | None:
        """The values of an instant query's result (None: the query failed or the server is down)."""
        try:
            got = requests.get(f"{self.api}/query", params={"query": query}, timeout=10).json()
        except (requests.RequestException, ValueError):
            return None
        if got.get("status") != "success":
            return None
        return [float(r["value"][1]) for r in got["data"]["result"]]

    def wait_for(self, query: str, timeout: float = 30) -> list[float]:
        """The values of `query` once it has any (the server has scraped that series)."""
        end = time.monotonic() + timeout
        while not (values := self.query(query)):
            assert time.monotonic() < end, f"Prometheus has no data for {query} after {timeout}s"
            time.sleep(0.5)
        return values

    def dashboard_results(self, timeout: float = 60) -> dict[str, list[float]]:
        if self.proc is None:
            if os.environ.get("CI") == "true":
                pytest.fail("the prometheus package could not be installed")
            pytest.skip("no prometheus binary (and no root or sudo apt-get to install it); the checks "
                        "before this one passed")
        assert self.query('max_over_time(up{job="ray"}[5m])') == [1.0], "Prometheus never scraped the cluster"
        end = time.monotonic() + timeout
        while True:
            results = {q: self.query(q) for q in dashboard_queries()}
            # data = at least one number: a ratio or quantile over no events in the window is NaN
            empty = [q for q, values in results.items() if not any(v == v for v in values or ())]
            if not empty or time.monotonic() > end:
                break
            time.sleep(1)
        assert not empty, f"dashboard queries without a number: {empty}"
        return results

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)


if __name__ == "__main__":
    # `make test`'s set-up step: install the package before the suite, so the test finds it
    found = prometheus_binary()
    print(f"prometheus: {found or 'not installed (needs root or passwordless sudo, and apt-get)'}")
    raise SystemExit(1 if found is None and os.environ.get("CI") == "true" else 0)
