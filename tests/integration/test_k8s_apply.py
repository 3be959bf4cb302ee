"""cluster/k8s.py against a loopback fake of the Kubernetes API server (kube_fake.py).

The real kubernetes client (in-process, and the CLI as a subprocess through a kubeconfig) talks
HTTP to a fake that applies RFC 6902 patches, enforces resourceVersion (409) and validates every
object it is sent against the official KubeRay CRD schema (422). The RayService is shaped as the
chart renders it with default values (epd: encode / prefill / decode groups of 1 pod, one Serve
replica per stage), running as the RayCluster KubeRay made from it (status.activeServiceStatus).
KubeRay's RayService controller leaves a running RayCluster alone when only replicas/min/max differ,
so pods must be set on the RayCluster itself; the tests check both objects. Expected objects are
written out by hand here, never built by cluster/k8s.py.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster.k8s import CLUSTERS, GROUP, JSON_PATCH, PLURAL, VERSION, Split, apply_split
from tests.integration.kube_fake import FakeKube, apply_patch

REPO = Path(__file__).resolve().parents[2]
NAME, NS, CLUSTER = "trisect", "trisect", "trisect-x7k2p"

SERVE = """\
applications:
  - name: trisect
    import_path: services.app:app_builder
    route_prefix: /
    args:
      mode: epd
      model: tiny-llava
      redis_url: redis://:${TRISECT_REDIS_PASSWORD}@trisect-redis:6379/0
      stages:
        ingress: {replicas: 1, num_gpus: 0}
        encode: {replicas: 1, num_gpus: 0}
        prefill: {replicas: 1, num_gpus: 0}
        decode: {replicas: 1, num_gpus: 0}
    deployments:
      - name: Ingress
        num_replicas: 1
        ray_actor_options: {num_cpus: 0, resources: {ingress_pool: 1}}
      - {name: EncodeServer, num_replicas: 1}
      - {name: PrefillServer, num_replicas: 1}
      - {name: DecodeServer, num_replicas: 1}
"""


def group(name: str) -> dict:
    return {"groupName": name, "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
            "rayStartParams": {"object-store-memory": "2147483648", "resources": f'"{{\\"{name}_pool\\":1}}"'},
            "template": {"metadata": {"labels": {"trisect.io/pool": name}},
                         "spec": {"containers": [{"name": "ray-worker", "image": "trisect:0.1.0",
                                                  "resources": {"limits": {"cpu": "2", "memory": "8Gi"}}}]}}}


def rayservice() -> dict:
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": {"spec": {"containers": [{"name": "ray-head", "image": "trisect:0.1.0"}]}}}
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": NAME, "namespace": NS, "labels": {"app.kubernetes.io/name": "trisect"}},
            "spec": {"serveConfigV2": SERVE,
                     "rayClusterConfig": {"rayVersion": "2.60.0", "headGroupSpec": head,
                                          "workerGroupSpecs": [group("encode"), group("prefill"), group("decode")]}}}


def raycluster(service: dict) -> dict:
    """The RayCluster KubeRay builds for `service`: its rayClusterConfig, its labels plus KubeRay's."""
    meta = service["metadata"]
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": CLUSTER, "namespace": NS,
                         "labels": {**meta["labels"], "ray.io/originated-from-cr-name": NAME}},
            "spec": copy.deepcopy(service["spec"]["rayClusterConfig"])}


@pytest.fixture
def kube():
    fake = FakeKube()
    service = rayservice()
    fake.seed({**service, "status": {"activeServiceStatus": {"rayClusterName": CLUSTER}}})
    fake.seed(raycluster(service))
    yield fake
    fake.close()


def cluster_of(kube) -> dict:
    return copy.deepcopy(kube.objects[("ray.io/v1", NS, CLUSTERS, CLUSTER)])


@pytest.fixture
def api(kube):
    conf = client.Configuration(host=kube.url)
    with client.ApiClient(conf) as c:
        yield client.CustomObjectsApi(c)


def groups(obj: dict) -> dict:
    spec = obj["spec"].get("rayClusterConfig", obj["spec"])          # a RayService's, or a RayCluster's
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def deployments(obj: dict) -> dict:
    (app,) = yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"]
    return {d["name"]: d for d in app["deployments"]}


def expect_pods(before: dict) -> dict:
    """`before` (a RayService or RayCluster) with pods decode=3, encode=0, by hand."""
    after = copy.deepcopy(before)
    g = groups(after)
    g["decode"].update(replicas=3, maxReplicas=3)      # widened: KubeRay clamps replicas to [min, max]
    g["encode"].update(replicas=0, minReplicas=0)
    return after


SPLIT = dict(pods={"decode": 3, "encode": 0}, replicas={"decode": 3, "prefill": 2})


def check_pods_applied(before: dict, after: dict):
    """The RayCluster: only the worker group counts changed."""
    assert after["spec"] == expect_pods(before)["spec"]
    assert after["metadata"]["labels"] == before["metadata"]["labels"]


def check_split_applied(before: dict, after: dict):
    """The RayService: worker group counts (for the next cluster) and the Serve overrides changed."""
    want = expect_pods(before)
    assert after["spec"]["rayClusterConfig"] == want["spec"]["rayClusterConfig"]
    d = deployments(after)
    assert d["DecodeServer"] == {"name": "DecodeServer", "num_replicas": 3}
    assert d["PrefillServer"] == {"name": "PrefillServer", "num_replicas": 2}
    assert deployments(before)["Ingress"] == d["Ingress"] and d["EncodeServer"]["num_replicas"] == 1
    # the app's args are untouched: Serve applies deployment overrides in place, args would rebuild the app
    (a0,), (a1,) = (yaml.safe_load(o["spec"]["serveConfigV2"])["applications"] for o in (before, after))
    assert a1["args"] == a0["args"] and a1["import_path"] == a0["import_path"]
    assert after["metadata"]["labels"] == before["metadata"]["labels"]


def test_split_is_a_json_patch_of_the_service_and_its_cluster(kube, api):
    before, cluster = kube.get(NS, NAME), cluster_of(kube)
    sent = apply_split(api, NAME, NS, Split(**SPLIT))
    after = kube.get(NS, NAME)
    check_split_applied(before, after)
    check_pods_applied(cluster, cluster_of(kube))
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}"
    assert [(m, p, ct) for m, p, ct, _ in kube.requests] == [
        ("GET", f"{base}/{PLURAL}/{NAME}", ""), ("PATCH", f"{base}/{PLURAL}/{NAME}", JSON_PATCH),
        ("GET", f"{base}/{CLUSTERS}/{CLUSTER}", ""), ("PATCH", f"{base}/{CLUSTERS}/{CLUSTER}", JSON_PATCH)]
    assert [kube.requests[i][3] for i in (1, 3)] == list(sent.values())
    for obj, patch in ((before, sent[f"{PLURAL}/{NAME}"]), (cluster, sent[f"{CLUSTERS}/{CLUSTER}"])):
        assert patch[0] == {"op": "replace", "path": "/metadata/resourceVersion",
                            "value": obj["metadata"]["resourceVersion"]}
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert after["status"] == before["status"]


def test_serve_replicas_alone_leave_the_cluster_alone(kube, api):
    cluster = cluster_of(kube)
    sent = apply_split(api, NAME, NS, Split(replicas={"decode": 2}))
    assert list(sent) == [f"{PLURAL}/{NAME}"] and cluster_of(kube) == cluster
    assert deployments(kube.get(NS, NAME))["DecodeServer"]["num_replicas"] == 2


def test_conflict_rereads_and_keeps_the_other_write(kube, api):
    """Someone writes the RayService between our read and our patch: 409, re-read, patch again."""
    writes = []

    def concurrent_writer(fake, key):
        if not writes:                      # once: the first PATCH finds the object changed under it
            obj = copy.deepcopy(fake.objects[key])
            obj["metadata"].setdefault("annotations", {})["example.com/touched-by"] = "another-client"
            groups(obj)["prefill"]["maxReplicas"] = 6
            writes.append(fake.write(key, obj)["metadata"]["resourceVersion"])

    kube.before_patch = concurrent_writer
    before = kube.get(NS, NAME)
    apply_split(api, NAME, NS, Split(**SPLIT))
    methods = [m for m, *_ in kube.requests]
    assert methods == ["GET", "PATCH", "GET", "PATCH", "GET", "PATCH"]     # service twice, then its cluster
    stale, fresh = kube.requests[1][3][0]["value"], kube.requests[3][3][0]["value"]
    assert stale == before["metadata"]["resourceVersion"] and fresh == writes[0]
    after = kube.get(NS, NAME)
    assert after["metadata"]["annotations"] == {"example.com/touched-by": "another-client"}   # not lost
    assert groups(after)["prefill"]["maxReplicas"] == 6
    groups(before)["prefill"]["maxReplicas"] = 6
    check_split_applied(before, after)


def test_endless_conflict_gives_up_after_the_retries(kube, api):
    kube.before_patch = lambda fake, key: fake.write(key, fake.objects[key])
    with pytest.raises(ApiException) as e:
        apply_split(api, NAME, NS, Split(pods={"decode": 2}), retries=2)
    assert e.value.status == 409
    assert [m for m, *_ in kube.requests].count("PATCH") == 3
    assert groups(kube.get(NS, NAME))["decode"]["replicas"] == 1
    assert groups(cluster_of(kube))["decode"]["replicas"] == 1          # never reached


@pytest.mark.parametrize("op, message", [
    ({"op": "replace", "path": "/spec/rayClusterConfig/workerGroupSpecs/2/replicas", "value": "three"},
     "spec/rayClusterConfig/workerGroupSpecs/2/replicas: 'three' is not of type 'integer'"),
    ({"op": "add", "path": "/spec/rayClusterConfig/workerGroupSpecs/2/replica", "value": 3},
     "Additional properties are not allowed ('replica' was unexpected)"),
    ({"op": "remove", "path": "/spec/rayClusterConfig/workerGroupSpecs/2/groupName"},
     "'groupName' is a required property"),
])
def test_fake_rejects_objects_the_crd_does_not_allow(kube, api, op, message):
    before = kube.get(NS, NAME)
    rv = {"op": "replace", "path": "/metadata/resourceVersion", "value": before["metadata"]["resourceVersion"]}
    with pytest.raises(ApiException) as e:
        api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME, [rv, op], _content_type=JSON_PATCH)
    assert e.value.status == 422 and message in json.loads(e.value.body)["message"]
    assert kube.get(NS, NAME) == before


def cli(kube, tmp_path, *args) -> subprocess.CompletedProcess:
    """`python -m cluster.k8s` with a kubeconfig pointing at the fake (no in-cluster config here)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
        "users": [{"name": "tester", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run([sys.executable, "-m", "cluster.k8s", "apply-split", NAME, "-n", NS, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


SPLIT_ARGS = ["--pods", "decode=3", "encode=0", "--replicas", "decode=3", "prefill=2"]


def test_cli_applies_a_split(kube, tmp_path):
    before, cluster = kube.get(NS, NAME), cluster_of(kube)
    out = cli(kube, tmp_path, *SPLIT_ARGS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"patched {PLURAL}/{NAME} in {NS}: 5 changes",        # 2 replicas, maxReplicas, minReplicas, serveConfigV2
        f"patched {CLUSTERS}/{CLUSTER} in {NS}: 4 changes"]
    check_split_applied(before, kube.get(NS, NAME))
    check_pods_applied(cluster, cluster_of(kube))


def test_cli_dry_run_prints_the_patch_and_sends_nothing(kube, tmp_path):
    before, cluster = kube.get(NS, NAME), cluster_of(kube)
    out = cli(kube, tmp_path, *SPLIT_ARGS, "--dry-run")
    assert out.returncode == 0, out.stderr
    patches = json.loads(out.stdout)
    assert [m for m, *_ in kube.requests] == ["GET", "GET"]    # read both, nothing written
    assert kube.get(NS, NAME) == before and cluster_of(kube) == cluster
    # the printed patches are the ones that work
    check_split_applied(before, apply_patch(before, patches[f"{PLURAL}/{NAME}"]))
    check_pods_applied(cluster, apply_patch(cluster, patches[f"{CLUSTERS}/{CLUSTER}"]))


def test_cli_reports_an_object_the_server_rejects(kube, tmp_path):
    """3e9 pods passes the CLI's own checks, but KubeRay's replicas is an int32: the server says 422."""
    before = kube.get(NS, NAME)
    out = cli(kube, tmp_path, "--pods", "decode=3000000000")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    first, *causes = out.stderr.strip().splitlines()
    assert first.startswith(f"error: the API server refused a patch for rayservice/{NAME} in {NS}: 422 Invalid: ")
    assert causes == ["  spec/rayClusterConfig/workerGroupSpecs/2/replicas: 3000000000 is out of range for int32",
                      "  spec/rayClusterConfig/workerGroupSpecs/2/maxReplicas: 3000000000 is out of range for int32"]
    assert kube.get(NS, NAME) == before


def test_cli_says_what_was_applied_when_the_cluster_patch_fails(kube, api):
    """The RayService took the split, its RayCluster keeps conflicting: the error names what changed."""
    from cluster.k8s import refusal
    kube.before_patch = lambda fake, key: key[2] == CLUSTERS and fake.write(key, fake.objects[key])
    with pytest.raises(ApiException) as e:
        apply_split(api, NAME, NS, Split(pods={"decode": 2}), retries=1)
    assert e.value.status == 409 and groups(kube.get(NS, NAME))["decode"]["replicas"] == 2
    lines = refusal(e.value, NAME, NS, 1).splitlines()
    assert f'409 Conflict: Operation cannot be fulfilled on {CLUSTERS}.ray.io "{CLUSTER}"' in lines[0]
    assert lines[1:] == [f"  already applied (not rolled back): {PLURAL}/{NAME}",
                         "  still conflicting after 1 retries: something keeps writing the object"]


def test_a_service_not_running_yet_gets_the_counts_for_its_first_cluster(kube, api, capsys):
    key = ("ray.io/v1", NS, PLURAL, NAME)
    kube.objects[key].pop("status")
    sent = apply_split(api, NAME, NS, Split(pods={"decode": 2}))
    assert list(sent) == [f"{PLURAL}/{NAME}"] and groups(kube.get(NS, NAME))["decode"]["replicas"] == 2
    assert "runs no RayCluster yet" in capsys.readouterr().err


def test_cli_refuses_a_split_that_does_not_fit_before_sending(kube, tmp_path):
    """A stage under Serve autoscaling, or a group the RayService lacks: a message, no PATCH."""
    out = cli(kube, tmp_path, "--pods", "llm=2")
    assert out.returncode == 1 and "no worker group ['llm'] in this RayService" in out.stderr
    key = ("ray.io/v1", NS, PLURAL, NAME)
    obj = kube.get(NS, NAME)
    obj["spec"]["serveConfigV2"] = SERVE.replace(
        "{name: DecodeServer, num_replicas: 1}",
        "{name: DecodeServer, autoscaling_config: {min_replicas: 1, max_replicas: 4}}")
    kube.write(key, obj)
    out = cli(kube, tmp_path, "--replicas", "decode=4")
    assert out.returncode == 1 and "stage 'decode' autoscales in this RayService" in out.stderr
    assert "Traceback" not in out.stderr
    assert "PATCH" not in [m for m, *_ in kube.requests]
