"""Servers that `trisect bench serve --compare` starts and stops itself, one at a time.

Life: `TrisectServer(mode, ...)` runs `trisect serve --mode MODE` as a child process on free loopback
ports — the very command a user runs, so a local cluster (its own Ray head and private redis-server,
or one in-process engine for `local`) comes up exactly as `services/serve.py` makes it. Entering waits
until the command prints that it serves and `/v1/models` answers; leaving sends SIGTERM (the command's
own clean shutdown of Serve, Ray and Redis) and, if it has not exited within a grace period, kills
its whole process group. Its output goes to a log file, named when start-up fails.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

MODES = ("local", "aggregated", "pd", "epd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrisectServer:
    def __init__(self, mode: str, model: str = "tiny-llava", extra_args: tuple[str, ...] = (),
                 startup_timeout_s: float = 300, stop_timeout_s: float = 60):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.model, self.extra_args = mode, model, tuple(extra_args)
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.http_port, self.grpc_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> "TrisectServer":
        cmd = [sys.executable, "-m", "services.cli", "serve", "--mode", self.mode, "--model", self.model,
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *self.extra_args]
        fd, self.log_path = tempfile.mkstemp(prefix=f"trisect-{self.mode}-", suffix=".log")
        with os.fdopen(fd, "w") as log:   # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        end = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trisect serve --mode {self.mode} exited ({self.proc.returncode}); "
                                   f"see {self.log_path}")
            with open(self.log_path) as f:
                serving = "trisect serving" in f.read()
            if serving and self._models_answer():
                return
            time.sleep(1.0)
        raise TimeoutError(f"trisect serve --mode {self.mode} not ready in {self.startup_timeout_s:.0f} s; "
                           f"see {self.log_path}")

    def _models_answer(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:                        # its own session: whatever of Ray or Redis outlived it goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
