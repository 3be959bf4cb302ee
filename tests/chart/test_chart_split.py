"""`cluster/k8s.py apply-split` on the RayService the chart really renders (docs/deployment.md's
commands), through the loopback fake API server that validates every object against the KubeRay
CRDs: the chart's output and the patcher agree on paths, group names and Serve deployment names.
"""
import copy
import json

import pytest

from tests.chart.test_chart import CHART, helm, objects, rayservice  # noqa: F401  (helm: the fixture)
from tests.integration.kube_fake import FakeKube
from tests.integration.test_k8s_apply import cli

CLUSTER = "trisect-x7k2p"


@pytest.fixture
def kube_of(helm):
    fakes = []

    def make(*values: str) -> FakeKube:
        rs = rayservice(objects(helm, *values))
        fake = FakeKube()
        fake.seed({**rs, "status": {"activeServiceStatus": {"rayClusterName": CLUSTER}}})
        fake.seed({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                   "metadata": {"name": CLUSTER, "namespace": rs["metadata"]["namespace"]},
                   "spec": copy.deepcopy(rs["spec"]["rayClusterConfig"])})
        fakes.append(fake)
        return fake

    yield make
    for f in fakes:
        f.close()


def test_the_documented_split_applies_to_the_default_chart(kube_of, tmp_path):
    kube = kube_of()
    args = ["--pods", "decode=6", "--replicas", "decode=6"]
    dry = cli(kube, tmp_path, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(json.loads(dry.stdout)) == [f"rayclusters/{CLUSTER}", "rayservices/trisect"]
    out = cli(kube, tmp_path, *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["patched rayservices/trisect in trisect: 3 changes",
                                       f"patched rayclusters/{CLUSTER} in trisect: 2 changes"]
    decode = {g["groupName"]: g for g in kube.objects[("ray.io/v1", "trisect", "rayclusters", CLUSTER)]
              ["spec"]["workerGroupSpecs"]}["decode"]
    assert (decode["replicas"], decode["maxReplicas"]) == (6, 6)


def test_an_autoscaled_stage_of_the_8gpu_example_is_refused(kube_of, tmp_path):
    kube = kube_of("-f", str(CHART / "values-8gpu-epd.yaml"))
    out = cli(kube, tmp_path, "--replicas", "decode=6")
    assert out.returncode == 1 and "stage 'decode' autoscales in this RayService" in out.stderr
    out = cli(kube, tmp_path, "--pods", "prefill=3", "--replicas", "prefill=3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["patched rayservices/trisect in trisect: 2 changes",
                                       f"patched rayclusters/{CLUSTER} in trisect: 1 changes"]


def test_role_switching_takes_pods_for_the_llm_pool_and_refuses_stage_replicas(kube_of, tmp_path):
    kube = kube_of("--set", "roleSwitching.enabled=true")
    out = cli(kube, tmp_path, "--replicas", "decode=2")
    assert out.returncode == 1 and "role switching is on" in out.stderr and "Traceback" not in out.stderr
    out = cli(kube, tmp_path, "--pods", "llm=2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["patched rayservices/trisect in trisect: 2 changes",
                                       f"patched rayclusters/{CLUSTER} in trisect: 2 changes"]
