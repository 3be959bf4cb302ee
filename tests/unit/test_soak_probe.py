"""The soak's process probe on this very process and a child it starts: psutil and the /proc
fallback see the same tree, the same descriptors, and a descriptor opened shows up."""
import os
import subprocess
import sys

from services.bench import probe


def test_psutil_and_proc_agree_on_a_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with_psutil = {p.pid: p for p in probe.process_tree(os.getpid())}
        from_proc = {p.pid: p for p in probe._proc_tree(os.getpid())}
        assert child.pid in with_psutil and set(with_psutil) == set(from_proc)
        me = with_psutil[os.getpid()]
        assert me.label == "server" and me.rss > 10 * 2**20
        assert abs(from_proc[os.getpid()].rss - me.rss) < 0.2 * me.rss
        before = probe.process_tree(os.getpid())[0].fds
        r, w = os.pipe()
        assert probe.process_tree(os.getpid())[0].fds == before + 2
        os.close(r)
        os.close(w)
    finally:
        child.kill()
        child.wait()


def test_the_verdict_compares_the_processes_alive_at_both_samples():
    from services.bench.probe import ProcInfo, Sample
    from services.bench.soak import verdict
    mib = 2**20
    base = Sample(0, [ProcInfo(1, "server", 500 * mib, 14), ProcInfo(2, "ray::IDLE", 100 * mib, 9)],
                  {"kv_blocks_used": 0, "in_flight": 0}, 10, frozenset({"reg"}))
    # worker 2 retired, worker 3 started; the server grew 1%; one TTL-less key more
    after = Sample(9, [ProcInfo(1, "server", 505 * mib, 14), ProcInfo(3, "ray::IDLE", 100 * mib, 9)],
                   {"kv_blocks_used": 0, "in_flight": 0}, 12, frozenset({"reg", "leak"}))
    checks = verdict({"baseline": base, "after": after, "ok": 5, "failed": 0}, 5.0)
    assert {k for k, (ok, _) in checks.items() if not ok} == {"redis_keys"}, checks
    assert "+1.00%" in checks["rss"][1] and "leak" in checks["redis_keys"][1]
    after.procs.append(ProcInfo(4, "ray::IDLE", 100 * mib, 9))
    after.backend["kv_blocks_used"] = 3
    checks = verdict({"baseline": base, "after": after, "ok": 5, "failed": 1}, 5.0)
    assert {k for k, (ok, _) in checks.items() if not ok} == {"redis_keys", "processes", "kv_blocks", "requests"}
