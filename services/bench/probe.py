"""What `trisect bench soak` reads from a running server between requests, without touching it.

Life: a `Probe` is made for one started server (its process id, HTTP base URL and, in cluster
modes, the private Redis URL the server printed). Each `sample()` returns one `Sample`:
- per process of the server's tree (the server, its Ray head processes and workers, redis-server —
  every descendant, found afresh each time since Ray starts and retires workers): RSS and open file
  descriptors, from psutil (in the venv) or /proc when psutil is missing;
- the backend's gauges from its own `/metrics` (`trisect_backend_{in_flight,kv_blocks_used,...}`);
- Redis: the key count and the names of keys without a TTL (every key trisect writes has a TTL or a
  bound, so a new TTL-less key is a leak; keys with a TTL, e.g. journals kept 60 s, expire).
"""
from __future__ import annotations

import os
import re
import time
import urllib.request
from dataclasses import dataclass, field

_GAUGE = re.compile(r"^trisect_backend_(\w+) ([0-9.e+-]+)$", re.M)


@dataclass(slots=True)
class ProcInfo:
    pid: int
    label: str          # a short name: "server", "raylet", "ray::ServeReplica:...", "redis-server"
    rss: int            # bytes
    fds: int


@dataclass(slots=True)
class Sample:
    t: float                                    # seconds since the probe was made
    procs: list[ProcInfo] = field(default_factory=list)
    backend: dict[str, float] = field(default_factory=dict)
    redis_keys: int | None = None
    redis_persistent: frozenset[str] = frozenset()

    @property
    def rss(self) -> int:
        return sum(p.rss for p in self.procs)

    @property
    def fds(self) -> int:
        return sum(p.fds for p in self.procs)

    def as_dict(self) -> dict:
        return {"t": round(self.t, 2), "rss": self.rss, "fds": self.fds, "backend": self.backend,
                "redis_keys": self.redis_keys, "redis_persistent": sorted(self.redis_persistent),
                "procs": [{"pid": p.pid, "label": p.label, "rss": p.rss, "fds": p.fds} for p in self.procs]}


def _label(cmdline: list[str], name: str, is_root: bool) -> str:
    if is_root:
        return "server"
    head = cmdline[0] if cmdline else name
    if head.startswith("ray::"):
        return head.split()[0][:48]
    base = os.path.basename(head)
    if base.startswith("python") and len(cmdline) > 1:     # a Python helper: name it by its script/module
        script = next((a for a in cmdline[1:] if not a.startswith("-")), "")
        return os.path.basename(script)[:48] or base
    return base[:48]


def process_tree(root_pid: int) -> list[ProcInfo]:
    try:
        import psutil
    except ImportError:
        return _proc_tree(root_pid)
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            with p.oneshot():
                out.append(ProcInfo(p.pid, _label(p.cmdline(), p.name(), p.pid == root_pid),
                                    p.memory_info().rss, p.num_fds()))
        except psutil.Error:               # exited between listing and reading: not ours to count
            continue
    return out


def _proc_tree(root_pid: int) -> list[ProcInfo]:
    """The same from /proc: children by parent pid, RSS from statm, fds by listing fd/."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d))
    todo, out, page = [root_pid], [], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo += parents.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * page
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            out.append(ProcInfo(pid, _label(cmd, "?", pid == root_pid), rss, len(os.listdir(f"/proc/{pid}/fd"))))
        except OSError:
            continue
    return out


def backend_gauges(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {name: float(v) for name, v in _GAUGE.findall(text)}


class Probe:
    def __init__(self, pid: int, base_url: str, redis_url: str | None = None, redis_match: str = "*"):
        self.pid, self.base_url, self.redis_match = pid, base_url, redis_match
        self.redis = None
        if redis_url:
            import redis
            self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.t0 = time.monotonic()

    def sample(self) -> Sample:
        s = Sample(time.monotonic() - self.t0, process_tree(self.pid), backend_gauges(self.base_url))
        if self.redis is not None:
            keys = list(self.redis.scan_iter(match=self.redis_match, count=1000))
            pipe = self.redis.pipeline(transaction=False)
            for k in keys:
                pipe.pttl(k)
            ttls = pipe.execute() if keys else []
            s.redis_keys = len(keys)
            s.redis_persistent = frozenset(k.decode(errors="replace") for k, t in zip(keys, ttls) if t == -1)
        return s

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
