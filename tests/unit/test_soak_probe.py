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
