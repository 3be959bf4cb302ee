"""A real Prometheus server (Debian's `prometheus` package) scraping a running cluster, evaluating
every query of the Grafana dashboard (docs/grafana/trisect-dashboard.json).

The package is installed by the test's own set-up when missing: as root with apt-get (CI, or this
development box), with a policy-rc.d that keeps the package's service from starting in the
background. Without it, on CI (`CI=true`) the check fails; elsewhere it is skipped.
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

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "trisect-dashboard.json"
WINDOW = "1m"          # Grafana's $__rate_interval, for the server here (scrapes every second)


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", WINDOW) for p in panels for t in p.get("targets", [])]


def _apt_install() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:                                  # the package's service must not start (nor linger)
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)


def prometheus_binary() -> str | None:
    if not shutil.which("prometheus"):
        _apt_install()
    return shutil.which("prometheus")


def dashboard_queries_return_data(target_url: str):
    """A generator: the first next() starts a Prometheus server scraping `target_url` every second;
    the second evaluates every dashboard query there and asserts each returns data."""
    binary = prometheus_binary()
    if binary is None:
        yield
        if os.environ.get("CI") == "true":
            pytest.fail("the prometheus package could not be installed")
        pytest.skip("no prometheus binary and no root apt-get to install it")
    target = target_url.split("//", 1)[1].split("/", 1)[0]
    work = tempfile.mkdtemp(prefix="prom")
    config = Path(work, "prometheus.yml")
    config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                      f"scrape_configs:\n- job_name: ray\n  static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(f"{work}/log", "w"))
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        yield
        end, empty = time.monotonic() + 60, None
        while empty is None or (empty and time.monotonic() < end):
            empty = []
            for query in dashboard_queries():
                try:
                    got = requests.get(f"{api}/query", params={"query": query}, timeout=10).json()
                except (requests.RequestException, ValueError):
                    got = {}
                if got.get("status") != "success" or not got["data"]["result"]:
                    empty.append((query, got.get("error")))
            if empty:
                time.sleep(1)
        assert not empty, f"dashboard queries without data: {empty}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
