"""Helpers of the log test: search every Serve replica log of an app for a request id."""
from __future__ import annotations

import glob
import os
import time

import ray


def find_in_logs(rid: str, app: str, deployments: list[str], timeout: float = 20) -> dict[str, list[str]]:
    """{deployment: lines of its replicas' logs naming `rid`}; waits until each has one (logs are
    flushed by the replicas' own handlers) or `timeout` passes."""
    logs = ray._private.worker._global_node.get_logs_dir_path()
    end = time.monotonic() + timeout
    while True:
        found = {}
        for d in deployments:
            lines = []
            for path in glob.glob(os.path.join(logs, "serve", f"replica_{app}_{d}_*.log")):
                with open(path, errors="replace") as f:
                    lines += [line.rstrip() for line in f if rid in line]
            found[d] = lines
        if all(found.values()) or time.monotonic() > end:
            return found
        time.sleep(0.5)
