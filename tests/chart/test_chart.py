"""The Helm chart renders what trisect and KubeRay accept, and refuses bad values with a message.

Needs helm from `make chart` (.tools/bin/helm, or $HELM). The rendered serveConfigV2 args must
build a real ClusterConfig, every RayService must pass the KubeRay CRD schema (crd_schema.py), and
a missing or invalid required value must fail `helm template` naming the value.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig
from tests.chart.crd_schema import errors

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "trisect"
EXAMPLES = sorted(CHART.glob("values-*.yaml"))


@pytest.fixture(scope="module")
def helm() -> str:
    path = os.environ.get("HELM") or str(REPO / ".tools" / "bin" / "helm")
    if not Path(path).exists():
        path = shutil.which("helm") or path
    assert Path(path).exists(), "helm not found: run `make chart` (it fetches helm into .tools/bin)"
    return path


def render(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "trisect", str(CHART), "-n", "trisect", *args],
                          capture_output=True, text=True, timeout=60)


def objects(helm: str, *args: str) -> list[dict]:
    out = render(helm, *args)
    assert out.returncode == 0, out.stderr
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def rayservice(objs: list[dict]) -> dict:
    (rs,) = [o for o in objs if o["kind"] == "RayService"]
    return rs


def serve_app(rs: dict) -> dict:
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return app


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "default")
def test_render_is_accepted_by_kuberay_and_trisect(helm, values, monkeypatch):
    rs = rayservice(objects(helm, *(["-f", str(values)] if values else [])))
    assert errors(rs) == []
    app = serve_app(rs)
    assert app["import_path"] == "services.app:app_builder"
    monkeypatch.setenv("TRISECT_REDIS_PASSWORD", "s3cret")
    cfg = ClusterConfig.from_dict(app["args"])          # what app_builder does with the args
    assert "s3cret@" in cfg.redis_url and "${" not in cfg.redis_url
    # every stage the mode runs has a Serve override; every pool it needs has a worker group
    names = {d["name"] for d in app["deployments"]}
    expected = {"ingress": "Ingress"} | {s: s.capitalize() + "Server" for s in cfg.stage_names() if s != "ingress"}
    assert names == {expected[s] for s in cfg.stage_names()}
    assert cfg.role_switching is False and cfg.bind_host == "0.0.0.0"
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pools = {g["groupName"]: g for g in groups}
    from cluster.config import POOL_OF
    assert set(pools) == {POOL_OF[s].removesuffix("_pool") for s in cfg.stage_names() if POOL_OF[s]}
    for name, g in pools.items():
        assert f'\\"{name}_pool\\"' in g["rayStartParams"]["resources"]
        assert int(g["rayStartParams"]["object-store-memory"]) >= 64 * 2**20


def test_pool_values_render_symmetrically(helm):
    """One helper renders every pool: the same values give groups that differ only by name."""
    groups = rayservice(objects(helm))["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    normalised = [yaml.safe_dump(g).replace(g["groupName"], "POOL") for g in groups]
    assert len(groups) == 3 and len(set(normalised)) == 1


def test_gpu_pool_limits_and_placement(helm):
    rs = rayservice(objects(helm, "-f", str(CHART / "values-8gpu-epd.yaml")))
    for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = g["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    decode = {d["name"]: d for d in serve_app(rs)["deployments"]}["DecodeServer"]
    assert decode["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 32}


def test_role_switching_renders_one_shared_llm_group(helm):
    rs = rayservice(objects(helm, "--set", "roleSwitching.enabled=true"))
    groups = [g["groupName"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert groups == ["encode", "llm"]
    app = serve_app(rs)
    assert app["args"]["role_switching"] is True
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "EncodeServer"}


def test_external_redis_writes_no_password_and_no_statefulset(helm):
    objs = objects(helm, "-f", str(CHART / "values-external-redis.yaml"))
    assert not [o for o in objs if o["kind"] == "StatefulSet"]
    rs = rayservice(objs)
    assert serve_app(rs)["args"]["redis_url"].startswith("rediss://default:${TRISECT_REDIS_PASSWORD}@")
    ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "redis.example.internal:6380"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "trisect-redis-credentials"


@pytest.mark.parametrize("args, message", [
    (["--set", "redis.mode=external"], "/redis/external/url"),                                     # required value missing
    (["--set", "redis.mode=external", "--set", "redis.external.url=http://x:6379"], "rediss?://"),
    (["--set", "config.mode=disaggregated"], "/config/mode"),                       # not an enum value
    (["--set", "config.model="], "/config/model"),                                  # empty required string
    (["--set", "image.repository=null"], "missing property 'repository'"),                                 # required value removed
    (["--set", "pools.decode.replicas=-1"], "/pools/decode/replicas"),
    (["--set", "config.kv_cache_mib=256"], "kv_cache_mib"),                        # a typo of a ClusterConfig key
    (["--set", "stages.decode.replicas=3"], "pools.decode holds at most 1"),       # replicas that no pod hosts
    (["--set", "pools.prefill.minReplicas=2"], "pools.prefill: need minReplicas <= replicas"),
], ids=["external-without-url", "url-not-redis", "bad-mode", "empty-model", "no-image",
        "negative-replicas", "unknown-config-key", "stage-exceeds-pool", "pool-bounds"])
def test_bad_values_fail_with_their_name(helm, args, message):
    out = render(helm, *args)
    assert out.returncode != 0, f"rendered despite {args}"
    assert message in out.stderr, out.stderr
