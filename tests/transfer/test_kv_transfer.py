"""The sender/receiver poll state machines of every backend, with a real payload."""
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch

from decoders.kv_payload import KVPayload, PayloadImage
from decoders.kv_transfer import TransferError, TransferState, backend
from decoders.sampling import SamplingParams

S = TransferState


def payload(n=40, seed=0) -> KVPayload:
    g = torch.Generator().manual_seed(seed)
    return KVPayload(request_id=f"r{seed}", token_ids=list(range(n + 1)), num_prompt_tokens=n,
                     kv=torch.randn(3, 2, n, 2, 8, generator=g), block_size=16,
                     sampling=SamplingParams(max_tokens=5, seed=3, stop=("x",)), rope_delta=-4,
                     mrope_positions=torch.arange(3 * n).view(3, n),
                     images=[PayloadImage(torch.randn(4, 8, generator=g), (1, 4, 4), "abc")])


def assert_same(a: KVPayload, b: KVPayload):
    assert torch.equal(a.kv, b.kv) and a.token_ids == b.token_ids and a.sampling == b.sampling
    assert a.rope_delta == b.rope_delta and torch.equal(a.mrope_positions, b.mrope_positions)
    assert torch.equal(a.images[0].embeds, b.images[0].embeds) and a.images[0].grid_thw == b.images[0].grid_thw


def poll_until_done(*parts, timeout=20):
    end = time.monotonic() + timeout
    while not all(p.poll().done for p in parts):
        assert time.monotonic() < end
        time.sleep(0.001)


def test_fake_success_path_and_ack():
    Sender, Receiver = backend("fake")
    p = payload()
    sender = Sender(p)
    assert sender.poll() is S.BOOTSTRAPPING
    rx = Receiver(sender.start())
    assert sender.poll() is S.TRANSFERRING
    with pytest.raises(TransferError):
        rx.payload()
    assert rx.poll() is S.SUCCESS
    assert sender.poll() is S.TRANSFERRING, "the sender waits for the receiver's verdict"
    sender.ack(True)
    assert sender.poll() is S.SUCCESS
    assert_same(rx.payload(), p)


def test_fake_injected_failure_and_timeouts():
    Sender, Receiver = backend("fake")
    sender = Sender(payload(), fail=True)
    rx = Receiver(sender.start())
    assert rx.poll() is S.FAILED and rx.error == "injected failure"
    sender.ack(False, rx.error)
    assert sender.poll() is S.FAILED
    lonely = Receiver("never-sent", timeout_s=0.01)
    time.sleep(0.02)
    assert lonely.poll() is S.FAILED and lonely.error == "timed out"
    unacked = Sender(payload(), timeout_s=0.01)
    unacked.start()
    time.sleep(0.02)
    assert unacked.poll() is S.FAILED


def test_payload_survives_bytes_round_trip():
    p = payload()
    assert_same(KVPayload.from_bytes(p.to_bytes()), p)


def test_objectstore_between_processes(ray_local):
    import ray
    Sender, _ = backend("objectstore")
    p = payload(n=64)
    sender = Sender(p)
    ticket = sender.start()

    @ray.remote
    def receive(ticket):
        from decoders.kv_transfer import backend as b
        rx = b("objectstore")[1](ticket)
        got = rx.wait()
        return got.to_bytes(), rx.state.value          # everything it received, KV included, exactly

    received, state = ray.get(receive.remote(ticket))
    assert state == "success"
    assert_same(KVPayload.from_bytes(received), p)      # torch.equal on the KV, not a checksum
    sender.ack(True)
    assert sender.poll() is S.SUCCESS


def test_prefaulted_object_store_takes_no_page_faults_on_put(ray_local):
    import resource

    import numpy as np

    from decoders.kv_transfer.objectstore import prefault_plasma
    assert prefault_plasma() == 256 * 2**20 and prefault_plasma() == 0   # the whole store, once
    data = np.ones(16 * 2**20, dtype=np.uint8)
    ray_local.put(data)                                # first-put costs (serializer set-up) stay out
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ref = ray_local.put(data)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1024, faults                       # not prefaulted: one per 4 KiB page, 4096
    assert np.array_equal(ray_local.get(ref), data)


def test_objectstore_carries_bfloat16_kv_bit_exact(ray_local):
    Sender, Receiver = backend("objectstore")
    p = payload(n=16)
    p.kv = p.kv.to(torch.bfloat16)
    got = Receiver(Sender(p).start()).wait()
    assert got.kv.dtype == torch.bfloat16 and torch.equal(got.kv, p.kv)


def _receive_in_child(name, ticket, out):
    from decoders.kv_transfer import backend as b
    got = b(name)[1](ticket).wait()
    out.put((got.kv.tolist(), got.token_ids, str(got.kv.dtype)))


def _transfer_to_child(name, p):
    """Start a transfer here, receive it in a spawned process; (sender, ticket, what it received)."""
    sender = backend(name)[0](p)
    ticket = sender.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_receive_in_child, args=(name, ticket, out))
    proc.start()
    received = out.get(timeout=60)
    proc.join(timeout=30)
    return sender, ticket, received


def test_collective_gloo_between_processes():
    p = payload(n=32)
    sender, _, (kv, tokens, _) = _transfer_to_child("collective", p)
    assert torch.equal(torch.tensor(kv), p.kv) and tokens == p.token_ids
    assert sender.poll() is S.TRANSFERRING
    sender.ack(True)
    assert sender.poll() is S.SUCCESS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shm_between_processes_and_segment_reuse(dtype):
    Sender, _ = backend("shm")
    p = payload(n=24)
    p.kv = p.kv.to(dtype)
    sender, ticket, (kv, tokens, got_dtype) = _transfer_to_child("shm", p)
    assert torch.equal(torch.tensor(kv, dtype=dtype), p.kv) and tokens == p.token_ids and got_dtype == str(dtype)
    assert sender.poll() is S.TRANSFERRING, "the segment is held until the verdict"
    sender.ack(True)
    assert sender.poll() is S.SUCCESS and sender.segment is None
    again = Sender(payload(n=24, seed=1))
    assert again.start()["segment"] == ticket["segment"], "a finished transfer's segment is reused"
    again.ack(False)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="checks POSIX shared memory where Linux keeps it")
def test_shm_segment_is_removed_when_its_creator_exits():
    """A multiprocessing child shares its parent's resource tracker: attaching there must leave the
    creator's registration alone, or the segment outlives its creator in /dev/shm."""
    here, root = os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    code = (f"import sys; sys.path[:0] = [{here!r}, {root!r}]\n"
            "from test_kv_transfer import _transfer_to_child, payload\n"
            "sender, ticket, _ = _transfer_to_child('shm', payload())\n"
            "sender.ack(True)\n"
            "print(ticket['segment'])\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    path = f"/dev/shm/{out.stdout.split()[-1]}"
    end = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < end:   # the tracker unlinks once its parent is gone
        time.sleep(0.05)
    assert not os.path.exists(path)
