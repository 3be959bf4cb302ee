"""Validate rendered manifests: core kinds with `kubernetes-validate --strict`, ray.io kinds against
the KubeRay CRD schema (crd_schema.py). Run by `make chart` in the tools venv:

    python tests/chart/validate.py .tools/rendered/*.yaml

Prometheus-operator kinds (PodMonitor, ServiceMonitor) have no schema here and are only listed.
Each RayService's head and worker pod templates are also written out as plain Pods into
`raypods/` beside the files, so that checkov (which skips custom resources) checks the Ray pods
too. Exit status 1 on any failure, each printed with its file, object and path.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crd_schema import errors  # noqa: E402

KUBERNETES_VERSION = "1.35.0"        # the kubectl/helm of DESIGN §6 (kubectl v1.35)
UNCHECKED = {"monitoring.coreos.com/v1"}


def ray_pods(service: dict) -> list[dict]:
    """The Pods a RayService's RayCluster will run, one per group, for checkov."""
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    meta = service["metadata"]
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {**g["template"].get("metadata", {}), "name": f"{meta['name']}-{name}",
                          "namespace": meta.get("namespace", "default")},
             "spec": g["template"]["spec"]} for name, g in groups]


def main(files: list[str]) -> int:
    failed = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, *files],
                            stdout=sys.stdout, stderr=sys.stderr).returncode != 0
    for f in files:
        for obj in yaml.safe_load_all(Path(f).read_text()):
            if not obj:
                continue
            name = f"{f}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["apiVersion"].startswith("ray.io/"):
                errs = errors(obj)
                for e in errs:
                    print(f"FAIL {name}: {e}")
                failed |= bool(errs)
                print(f"{'FAIL' if errs else 'ok  '} {name} against the KubeRay CRD")
                if obj["kind"] == "RayService":
                    out = Path(f).parent / "raypods" / Path(f).name
                    out.parent.mkdir(exist_ok=True)
                    out.write_text(yaml.safe_dump_all(ray_pods(obj)))
            elif obj["apiVersion"] in UNCHECKED:
                print(f"note {name}: no schema for {obj['apiVersion']} here, not validated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
