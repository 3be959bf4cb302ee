"""Apply a split — pods per worker group, Serve replicas per stage — to a running RayService.

Life of one apply: read the RayService (ray.io/v1) with the kubernetes client, build a JSON Patch
that sets `workerGroupSpecs[i].replicas` (widening min/max when the new count lies outside them, or
KubeRay would clamp it back) and rewrites `serveConfigV2` with the stages' `num_replicas` in the
application's `deployments` overrides (Serve applies those in place; changing the app's `args`
would rebuild the application and restart its ingress). The patch starts by replacing
`metadata.resourceVersion` with the version it was built from: if anyone wrote the object since,
the API server answers 409 Conflict, and the apply re-reads and rebuilds the patch (bounded
retries). A dry run prints the patch and sends nothing.

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


def split_patch(obj: dict, split: Split) -> list[dict]:
    """The JSON Patch that applies `split` to the RayService `obj` (as read, with resourceVersion)."""
    ops = [{"op": "replace", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]}]
    groups = obj["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
    index = {g["groupName"]: i for i, g in enumerate(groups)}
    unknown = set(split.pods) - set(index)
    if unknown:
        raise ValueError(f"no worker group {sorted(unknown)} in this RayService; it has {list(index)}")
    for name, n in split.pods.items():
        i, g = index[name], groups[index[name]]
        base = f"/spec/rayClusterConfig/workerGroupSpecs/{i}"
        ops.append({"op": "replace", "path": f"{base}/replicas", "value": n})
        if n < g.get("minReplicas", 0):
            ops.append({"op": "replace", "path": f"{base}/minReplicas", "value": n})
        if n > g.get("maxReplicas", n):
            ops.append({"op": "replace", "path": f"{base}/maxReplicas", "value": n})
    if split.replicas:
        ops.append({"op": "replace", "path": "/spec/serveConfigV2",
                    "value": _serve_config(obj["spec"].get("serveConfigV2", ""), split.replicas)})
    return ops


def _serve_config(text: str, replicas: dict[str, int]) -> str:
    config = yaml.safe_load(text) or {}
    apps = [a for a in config.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"serveConfigV2 must hold exactly one application of {IMPORT_PATH}, found {len(apps)}")
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


def apply_split(api, name: str, namespace: str, split: Split, dry_run: bool = False,
                retries: int = 5, out=sys.stdout) -> list[dict]:
    """Patch RayService `name`; `api` is a kubernetes.client.CustomObjectsApi. Returns the patch sent
    (or that would be sent). A 409 Conflict re-reads the object and retries, at most `retries` times."""
    from kubernetes.client.exceptions import ApiException

    for attempt in range(retries + 1):
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        patch = split_patch(obj, split)
        if dry_run:
            print(json.dumps(patch, indent=2), file=out)
            return patch
        try:
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch,
                                               _content_type=JSON_PATCH)
            return patch
        except ApiException as e:
            if e.status != 409 or attempt == retries:
                raise
    raise AssertionError("unreachable")


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
    lines = [f"error: the API server refused the patch to rayservice/{name} in {namespace}: "
             f"{e.status} {body.get('reason') or e.reason}: {body.get('message') or e.body}"]
    lines += [f"  {c.get('field', '')}: {c.get('message', '')}" for c in body.get("details", {}).get("causes", [])]
    if e.status == 409:
        lines.append(f"  still conflicting after {retries} retries: something keeps writing this RayService")
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
        print(f"patched rayservice/{args.name} in {args.namespace}: {len(patch) - 1} changes")
    return 0

if __name__ == "__main__":
    sys.exit(main())
