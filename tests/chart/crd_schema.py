"""Validate ray.io objects against the official KubeRay CRD schema, strictly.

The CRDs are reference data in `../shared/k8s/crds/` beside the repository (KubeRay's
ray-operator/config/crd/bases; see ../shared/k8s/README.md), read at test time and not copied in;
`TRISECT_CRDS` points elsewhere. Their `openAPIV3Schema` is used as a JSON Schema with one change
that makes it strict: an object schema that lists `properties` and neither allows extra ones nor
says `x-kubernetes-preserve-unknown-fields` rejects unknown keys — the API server would prune them
silently (or reject them under `kubectl --validate=strict`), so a misspelt field is an error here.
CEL rules (`x-kubernetes-validations`) are not evaluated.

Used by the chart checks (tests/chart/validate.py, the tools venv) and by the fake API server of
the cluster/k8s.py tests (the project venv): both have jsonschema and PyYAML.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def crd_dir() -> Path:
    d = Path(os.environ.get("TRISECT_CRDS") or REPO.parent / "shared" / "k8s" / "crds")
    if not d.is_dir():
        raise FileNotFoundError(f"KubeRay CRDs not found at {d}: set TRISECT_CRDS to the folder holding "
                                f"{sorted(CRD_FILES.values())}")
    return d


def strict(node):
    """A copy of `node` in which object schemas with properties reject unknown keys."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def validator(kind: str, version: str = "v1") -> jsonschema.Draft7Validator:
    if kind not in CRD_FILES:
        raise KeyError(f"no CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)      # the CRDs are ~1 MB of YAML each
    crd = yaml.load((crd_dir() / CRD_FILES[kind]).read_text(), Loader=loader)
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(strict(schema))


def errors(obj: dict) -> list[str]:
    """Every schema violation of a ray.io object, as 'path: message' (empty when valid)."""
    api = obj.get("apiVersion", "")
    if not api.startswith("ray.io/"):
        return [f"apiVersion {api!r} is not ray.io"]
    v = validator(obj.get("kind", ""), api.split("/", 1)[1])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
