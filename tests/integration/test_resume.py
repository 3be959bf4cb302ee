"""Resume from the journal: an ingress process is SIGKILLed mid-stream and its clients reconnect to
another ingress with their request id and the count of tokens they hold — one over HTTP
(`x-request-id`, `x-trisect-resume-from`), two over gRPC (the SDK's `resume_from`) — and get the
rest of their streams, no gap, no repeated token: the greedy ones token-exact against the independent
reference, the sampled one exactly the journal's tokens (journaled before each delta is sent).

Two real ingress processes (tests/integration/journal_ingress.py: ClusterBackend + an in-process
aggregated stage, real HTTP and gRPC) share a real redis-server's journal. The killed one paces its
tokens so both streams are provably mid-way when it dies; the clients hold more tokens than the
journal's last batched append, so the survivor re-prefills and regenerates the difference unseen.
"""
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from cluster.redis_store import RedisStore, StoreConfig
from services.client import TrisectClient
from services.errors import TrisectError
from tests.reference import hf_greedy

N, CUT = 48, 20                       # tokens per stream; the clients read at least CUT before the kill
SAMPLED = {"temperature": 0.9, "seed": 7}
PROMPTS = {"http": "tell me about the small red fox and the river", "grpc": "a tall green tree under a blue sky"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Ingress:
    def __init__(self, redis_url: str, namespace: str, delay_s: float, cache):
        env = {**os.environ, "TRISECT_CACHE": str(cache)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.journal_ingress", redis_url, namespace,
                                      str(delay_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)   # a hang guard, not a timing check
        assert ready, "ingress process did not start"
        _, http_port, grpc_port = self.proc.stdout.readline().split()
        self.http, self.grpc = int(http_port), f"127.0.0.1:{grpc_port}"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def http_stream(port: int, rid: str, prompt: str, resume_from=None, on_token=None) -> tuple[int, list[int]]:
    """(status, token ids received) of a streamed chat completion; a dropped connection just ends it."""
    headers = {"content-type": "application/json", "x-request-id": rid}
    if resume_from is not None:
        headers["x-trisect-resume-from"] = str(resume_from)
    body = {"model": "", "messages": [{"role": "user", "content": prompt}], "max_tokens": N, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    got = []
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        r = conn.getresponse()
        if r.status != 200:
            return r.status, json.loads(r.read())
        while line := r.readline():
            if line.startswith(b"data: {"):
                msg = json.loads(line[6:])
                for c in msg.get("choices", []):
                    got += c.get("token_ids", [])
                if on_token:
                    on_token(len(got))
    except (http.client.HTTPException, OSError):
        pass                                       # the ingress died mid-stream
    finally:
        conn.close()
    return 200, got


def closed(store, rid: str, wait_s: float = 30):
    """The journal entry once its ingress has closed it (the close is a task after the stream ends)."""
    end = time.monotonic() + wait_s
    while (entry := store.journal_read(rid)).state == "running" and time.monotonic() < end:
        time.sleep(0.05)
    return entry


@pytest.fixture(scope="module")
def ingresses(redis_server, trisect_cache):
    namespace = "resume" + uuid.uuid4().hex[:8]
    a = Ingress(redis_server.url, namespace, 0.1, trisect_cache)      # paced: killed mid-stream
    b = Ingress(redis_server.url, namespace, 0.0, trisect_cache)
    store = RedisStore(StoreConfig(url=redis_server.url, namespace=namespace))
    yield a, b, store
    for i in (a, b):
        i.kill()
    store.clear()
    store.close()


def test_clients_of_a_killed_ingress_resume_on_another_token_exact(ingresses, tiny_llava):
    a, b, store = ingresses
    refs = {k: hf_greedy(tiny_llava, p, [], N) for k, p in PROMPTS.items()}
    rids = {k: f"resume-{k}-{uuid.uuid4().hex[:6]}" for k in PROMPTS}
    rids["sampled"] = f"resume-sampled-{uuid.uuid4().hex[:6]}"
    reached = {k: threading.Event() for k in rids}
    got: dict[str, list[int]] = {}

    def over_http():
        _, got["http"] = http_stream(a.http, rids["http"], PROMPTS["http"],
                                     on_token=lambda n: n >= CUT and reached["http"].set())

    def over_grpc(k="grpc", **sampling):
        got[k] = []
        try:
            with TrisectClient(a.grpc, timeout=120) as c:
                for d in c.stream(PROMPTS["grpc"], request_id=rids[k], max_tokens=N, ignore_eos=True, **sampling):
                    got[k] += d.token_ids
                    if len(got[k]) >= CUT:
                        reached[k].set()
        except TrisectError:
            pass                                   # UNAVAILABLE: the ingress died mid-stream

    threads = [threading.Thread(target=f) for f in (over_http, over_grpc,
                                                     lambda: over_grpc("sampled", **SAMPLED))]
    for t in threads:
        t.start()
    for e in reached.values():
        assert e.wait(240), "a stream never reached the cut"
    a.kill()                                       # SIGKILL: no finally, no journal close
    for t in threads:
        t.join(60)
    for k in PROMPTS:
        assert CUT <= len(got[k]) < N and got[k] == refs[k][:len(got[k])], (k, got[k])
        entry = store.journal_read(rids[k])
        # left as the dead ingress wrote it: open, its tokens a prefix of the true output
        assert entry.state == "running" and entry.tokens == refs[k][:len(entry.tokens)], (k, entry)

    # a sampled request is journaled before each delta is sent: the journal holds all the client has
    sampled = store.journal_read(rids["sampled"]).tokens
    assert CUT <= len(got["sampled"]) <= len(sampled) and sampled[:len(got["sampled"])] == got["sampled"]
    print(f"killed mid-stream: clients held {[len(got[k]) for k in rids]} tokens, the journal "
          f"{[len(store.journal_read(rids[k]).tokens) for k in rids]} (of {N})")
    status, rest_http = http_stream(b.http, rids["http"], PROMPTS["http"], resume_from=len(got["http"]))
    with TrisectClient(b.grpc, timeout=120) as c:
        rest_grpc = [t for d in c.stream(PROMPTS["grpc"], request_id=rids["grpc"], resume_from=len(got["grpc"]),
                                         max_tokens=N, ignore_eos=True) for t in d.token_ids]
        rest_sampled = [t for d in c.stream(PROMPTS["grpc"], request_id=rids["sampled"], max_tokens=N, ignore_eos=True,
                                            resume_from=len(got["sampled"]), **SAMPLED) for t in d.token_ids]
    assert status == 200
    assert got["http"] + rest_http == refs["http"], (len(got["http"]), rest_http)
    # sampled: no gap, no repeat — what the client holds is exactly the journal's whole request
    final = closed(store, rids["sampled"])
    assert final.state == "finished:length" and got["sampled"] + rest_sampled == final.tokens and len(final.tokens) == N
    assert got["grpc"] + rest_grpc == refs["grpc"], (len(got["grpc"]), rest_grpc)
    for k in PROMPTS:
        entry = closed(store, rids[k])
        assert entry.state == "finished:length" and entry.tokens == refs[k]
        assert 0 < store.client.pttl(store.key("job", rids[k])) <= 60_000   # a closed journal expires

    # a finished stream replays from the journal; a different request or an unknown id is refused
    status, tail = http_stream(b.http, rids["http"], PROMPTS["http"], resume_from=10)
    assert status == 200 and tail == refs["http"][10:]
    for rid, prompt in ((rids["http"], "another prompt"), ("resume-unknown", PROMPTS["http"])):
        status, err = http_stream(b.http, rid, prompt, resume_from=3)
        assert status == 400 and err["error"]["param"] == "x-trisect-resume-from", err
