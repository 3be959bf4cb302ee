"""`trisect bench transfer` end to end on a tiny payload: every backend moves the KV between two
processes, the received bytes are CRC-checked against the sent ones, and the JSON carries it all."""
import json

import pytest

from services.bench import transfer


@pytest.mark.slow
def test_bench_transfer_end_to_end(tmp_path):
    out = tmp_path / "transfer.json"
    assert transfer.main(["--sizes-mib", "4", "--repeats", "2", "--object-store-mib", "256", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["object_store_memory_mib"] == 256 and data["prefault_object_store"] is True
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"memcpy", "objectstore", "shm", "collective"}
    for r in rows.values():
        assert r["size_mib"] == 4 and r["bytes"] == 4 * 1024 * 1024 and r["repeats"] == 2
        assert r["gbps"] > 0 and r["verified"] is True
    for name in ("objectstore", "shm", "collective"):
        assert rows[name]["ratio_to_memcpy"] > 0
    assert rows["objectstore"]["get_median_s"] >= 0 and rows["objectstore"]["gbps_materialised"] > 0


def test_bench_transfer_rejects_a_corrupt_receive():
    with pytest.raises(transfer.ChecksumError):
        transfer._verify("objectstore", 4, 0x1234, 0x4321)
