"""Apply a split — pods per worker group, Serve replicas per stage — to a running RayService.

Life of one apply: read the RayService (ray.io/v1) with the kubernetes client and build a JSON
Patch that sets `workerGroupSpecs[i].replicas` (widening min/max when the new count lies outside
them, or KubeRay would clamp it back) and rewrites `serveConfigV2` with the stages' `num_replicas`
in the application's `deployments` overrides (Serve applies those in place; changing the app's
`args` would rebuild the application and restart its ingress). Then the same worker group ops go
to the RayCluster(s) the RayService runs (`status.activeServiceStatus.rayClusterName`, and the
pending one during an upgrade): KubeRay's RayService controller hashes the cluster spec *without*
replicas / minReplicas / maxReplicas and leaves a running RayCluster alone when only those differ
(they are the autoscaler's to move), so the RayService patch alone records the counts for the next
cluster but starts no pod; the RayCluster patch is what starts or stops them. Serve replica counts
reach the running cluster through serveConfigV2 (KubeRay re-sends a changed config to Serve).

Every patch starts by replacing `metadata.resourceVersion` with the version it was built from: if
anyone wrote the object since, the API server answers 409 Conflict, and the apply re-reads and
rebuilds that patch (bounded retries). A dry run reads, prints the patches and sends nothing.

`patch_namespaced_custom_object` must be given `_content_type="application/json-patch+json"`:
its default is merge-patch, which would take the list of operations for the object itself.

    python -m cluster.k8s apply-split trisect -n serving --pods decode=4 --replicas decode=8 [--dry-run]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field

import yaml

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
CLUSTERS = "rayclusters"
JSON_PATCH = "application/json-patch+json"
IMPORT_PATH = "services.app:app_builder"
DEPLOYMENT_OF = {"ingress": "Ingress", "encode": "EncodeServer", "prefill": "PrefillServer",
                 "decode": "DecodeServer", "aggregated": "AggregatedServer"}


@dataclass(slots=True)
class Split:
    pods: dict[str, int] = field(default_factory=dict)       # worker group name → pods
    replicas: dict[str, int] = field(default_factory=dict)   # stage → Serve replicas

    def __post_init__(self):
        for what, counts in (("pods", self.pods), ("replicas", self.replicas)):
            for name, n in counts.items():
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"{what}[{name!r}] must be an integer >= 0, got {n!r}")
        unknown = set(self.replicas) - set(DEPLOYMENT_OF)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {list(DEPLOYMENT_OF)}")
        if not self.pods and not self.replicas:
            raise ValueError("an empty split changes nothing")


def _group_ops(groups: list[dict], pods: dict[str, int], base: str) -> list[dict]:
    index = {g["groupName"]: i for i, g in enumerate(groups)}
    unknown = set(pods) - set(index)
    if unknown:
        raise ValueError(f"no worker group {sorted(unknown)} in this RayService; it has {list(index)}")
    ops = []
    for name, n in pods.items():
        i, g = index[name], groups[index[name]]
        ops.append({"op": "replace", "path": f"{base}/{i}/replicas", "value": n})
        if n < g.get("minReplicas", 0):
            ops.append({"op": "replace", "path": f"{base}/{i}/minReplicas", "value": n})
        if n > g.get("maxReplicas", n):
            ops.append({"op": "replace", "path": f"{base}/{i}/maxReplicas", "value": n})
    return ops


def _version(obj: dict) -> dict:
    return {"op": "replace", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]}


def split_patch(obj: dict, split: Split) -> list[dict]:
    """The JSON Patch that applies `split` to the RayService `obj` (as read, with resourceVersion)."""
    groups = obj["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
    ops = [_version(obj)] + _group_ops(groups, split.pods, "/spec/rayClusterConfig/workerGroupSpecs")
    if split.replicas:
        ops.append({"op": "replace", "path": "/spec/serveConfigV2",
                    "value": _serve_config(obj["spec"].get("serveConfigV2", ""), split.replicas)})
    return ops


def cluster_patch(cluster: dict, split: Split) -> list[dict]:
    """The JSON Patch that sets the pods of `split` on a RayCluster `cluster` (as read)."""
    return [_version(cluster)] + _group_ops(cluster["spec"].get("workerGroupSpecs", []), split.pods,
                                           "/spec/workerGroupSpecs")


def running_clusters(service: dict) -> list[str]:
    """The RayClusters a RayService runs now: the active one, and the pending one of an upgrade."""
    st = service.get("status") or {}
    names = [(st.get(k) or {}).get("rayClusterName") for k in ("activeServiceStatus", "pendingServiceStatus")]
    return [n for n in names if n]


def _serve_config(text: str, replicas: dict[str, int]) -> str:
    config = yaml.safe_load(text) or {}
    apps = [a for a in config.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"serveConfigV2 must hold exactly one application of {IMPORT_PATH}, found {len(apps)}")
    if apps[0].get("args", {}).get("role_switching") and {"prefill", "decode"} & set(replicas):
        raise ValueError("role switching is on: prefill and decode replicas are one LLMPool deployment whose "
                         "roles live in Redis; set the llm pool's --pods and the roles with `trisect roles`")
    overrides = apps[0].setdefault("deployments", [])
    by_name = {d["name"]: d for d in overrides}
    for stage, n in replicas.items():
        d = by_name.get(DEPLOYMENT_OF[stage])
        if d is None:
            overrides.append({"name": DEPLOYMENT_OF[stage], "num_replicas": n})
        elif "autoscaling_config" in d:
            raise ValueError(f"stage {stage!r} autoscales in this RayService; a split sets fixed counts: "
                             f"leave it out of the split or turn its autoscaling off")
        else:
            d["num_replicas"] = n
    return yaml.safe_dump(config, sort_keys=False)


def _patch(api, plural: str, name: str, namespace: str, build, dry_run: bool, retries: int):
    """Read, build, send; on 409 re-read and rebuild, at most `retries` times. Returns (object read, patch)."""
    from kubernetes.client.exceptions import ApiException

    for attempt in range(retries + 1):
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        patch = build(obj)
        if dry_run:
            return obj, patch
        try:
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, patch,
                                               _content_type=JSON_PATCH)
            return obj, patch
        except ApiException as e:
            if e.status != 409 or attempt == retries:
                raise
    raise AssertionError("unreachable")


def apply_split(api, name: str, namespace: str, split: Split, dry_run: bool = False,
                retries: int = 5, out=sys.stdout) -> dict[str, list[dict]]:
    """Patch RayService `name` and, for pods, the RayClusters it runs; `api` is a
    kubernetes.client.CustomObjectsApi. Returns {"rayservices/NAME": patch, "rayclusters/C": patch}
    as sent (or, in a dry run, printed as one JSON object and not sent)."""
    service, patch = _patch(api, PLURAL, name, namespace, lambda o: split_patch(o, split), dry_run, retries)
    sent = {f"{PLURAL}/{name}": patch}
    if split.pods:
        clusters = running_clusters(service)
        if not clusters:            # not running yet: KubeRay will build its cluster from the patched spec
            print(f"note: rayservice/{name} runs no RayCluster yet (status.activeServiceStatus is empty); "
                  "its pod counts apply when KubeRay creates one", file=sys.stderr)
        from kubernetes.client.exceptions import ApiException
        for cluster in clusters:
            try:
                _, sent[f"{CLUSTERS}/{cluster}"] = _patch(api, CLUSTERS, cluster, namespace,
                                                          lambda o: cluster_patch(o, split), dry_run, retries)
            except ApiException as e:
                e.applied = list(sent)          # what this apply had already changed when it failed
                raise
    if dry_run:
        print(json.dumps(sent, indent=2), file=out)
    return sent


def _counts(items: list[str], flag: str) -> dict[str, int]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"{flag} takes NAME=COUNT, got {item!r}")
        out[key] = int(value)
    return out


def refusal(e, name: str, namespace: str, retries: int) -> str:
    """What the API server said, for a person: status, reason, message and one line per cause."""
    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        body = {}
    lines = [f"error: the API server refused a patch for rayservice/{name} in {namespace}: "
             f"{e.status} {body.get('reason') or e.reason}: {body.get('message') or e.body}"]
    lines += [f"  {c.get('field', '')}: {c.get('message', '')}" for c in body.get("details", {}).get("causes", [])]
    if getattr(e, "applied", None):
        lines.append(f"  already applied (not rolled back): {', '.join(e.applied)}")
    if e.status == 409:
        lines.append(f"  still conflicting after {retries} retries: something keeps writing the object")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.k8s", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("apply-split", help="set worker group pods and Serve replicas of a RayService")
    p.add_argument("name")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--pods", nargs="*", default=[], metavar="GROUP=N")
    p.add_argument("--replicas", nargs="*", default=[], metavar="STAGE=N")
    p.add_argument("--retries", type=int, default=5, help="re-read and re-send on 409 Conflict, at most this often")
    p.add_argument("--dry-run", action="store_true", help="print the JSON Patch, send nothing")
    args = ap.parse_args(argv)
    try:
        split = Split(_counts(args.pods, "--pods"), _counts(args.replicas, "--replicas"))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    try:
        patch = apply_split(client.CustomObjectsApi(), args.name, args.namespace, split,
                            dry_run=args.dry_run, retries=args.retries)
    except ValueError as e:          # the split does not fit this RayService: nothing was sent
        raise SystemExit(f"error: rayservice/{args.name} in {args.namespace}: {e}")
    except ApiException as e:
        print(refusal(e, args.name, args.namespace, args.retries), file=sys.stderr)
        return 1
    if not args.dry_run:
        for what, ops in patch.items():
            print(f"patched {what} in {args.namespace}: {len(ops) - 1} changes")
    return 0

if __name__ == "__main__":
    sys.exit(main())
