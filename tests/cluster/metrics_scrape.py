"""Helpers of the metrics tests: scrape a Prometheus endpoint, pick samples, wait for values."""
from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> list[tuple[str, dict, float]]:
    """[(sample name, labels, value)] of one scrape."""
    text = requests.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples, name: str, workers: set[str] | None = None, **labels) -> float | None:
    """Sum of the samples called `name` whose labels include `labels` (None if there is none).
    `workers`: only samples of Ray workers not in this set (the ones of the app under test)."""
    got = [v for n, lab, v in samples if n == name and all(lab.get(k) == str(x) for k, x in labels.items())
           and (workers is None or lab.get("WorkerId") not in workers)]
    return sum(got) if got else None


def worker_ids(samples) -> set[str]:
    return {lab["WorkerId"] for _, lab, _ in samples if "WorkerId" in lab}


def wait_for(url: str, check, timeout: float = 30, interval: float = 0.5):
    """Scrape until `check(samples)` is truthy; returns its value (AssertionError with the last
    samples' trisect part otherwise)."""
    end = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        ok = check(samples)
        if ok:
            return ok
        if time.monotonic() > end:
            names = sorted({(n, tuple(sorted((k, v) for k, v in lab.items() if k in ("role", "code", "transport",
                                                                                      "backend"))), val)
                            for n, lab, val in samples if "trisect" in n})
            raise AssertionError(f"timed out; trisect samples: {names}")
        time.sleep(interval)


def read_events(lines, n: int) -> int:
    """Reads SSE lines until `n` `data:` events came (or the stream ended); how many came."""
    seen = 0
    for line in lines:
        seen += line.startswith(b"data:")
        if seen >= n:
            break
    return seen
