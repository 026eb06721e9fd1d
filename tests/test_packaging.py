"""Packaging: the wheel, the boundary of the operator image, what the images install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {req.name.lower().replace("_", "-"): req for req in parsed}


def test_operator_image_requirements_match_pyproject() -> None:
    """docker/operator-requirements.txt lists the operator's dependencies with the specifiers of
    pyproject.toml, so the wheel installed with --no-deps beside it gets what it was tested with."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _requirements(project["dependencies"] + project["optional-dependencies"]["operator"])
    image = _requirements((REPO / "docker" / "operator-requirements.txt").read_text().splitlines())
    assert image, "docker/operator-requirements.txt lists nothing"
    assert "torch" not in image and "torchvision" not in image
    for name, requirement in image.items():
        assert name in declared, f"{name} is not a dependency in pyproject.toml"
        assert requirement.specifier == declared[name].specifier, name


# The training stack the operator image leaves out: nothing outside the training path may need it.
TRAINING_ONLY = (
    "torch",
    "torchvision",
    "numpy",
    "hyperopt",
    "sklearn",
    "scipy",
    "PIL",
    "matplotlib",
    "numba",
    "llvmlite",
)

_BLOCK_TRAINING = f"""
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINING_ONLY!r}:
            raise ImportError(f"{{name}} is not installed in this test")
sys.meta_path.insert(0, _Blocked())
"""


def test_operator_spec_planner_store_and_status_need_no_training_stack(tmp_path: Path) -> None:
    """What the operator image runs, and `selfaugment status`, with PyTorch, NumPy, hyperopt and
    the rest of the training stack unimportable: the boundary the operator image relies on."""
    spec = (REPO / "examples" / "search-smoke.yaml").read_text()
    script = _BLOCK_TRAINING + (
        "import yaml\n"
        "import selfaugment.operator.handlers, selfaugment.operator.__main__\n"
        "from selfaugment.cli import main\n"
        "from selfaugment.trainer.spec import AugmentSearchSpec\n"
        "from selfaugment.trainer.store import open_store\n"
        "from selfaugment.trainer.store.layout import prepare_run\n"
        f"spec = AugmentSearchSpec.model_validate(yaml.safe_load({spec!r}))\n"
        f"prepare_run(open_store({str(tmp_path / 'run')!r}), spec)\n"
        f"code = main(['status', {str(tmp_path / 'run')!r}])\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{TRAINING_ONLY!r})\n"
        "print('leaked', leaked)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stage: base" in done.stdout and "leaked []" in done.stdout


def test_the_wheel_holds_every_module_and_imports_from_itself(tmp_path: Path) -> None:
    """Build the wheel from pyproject.toml as the images do, unpack it and import every module
    from it (not from the editable install): no module is left out of the package mapping."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("selfaugment-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
        in_wheel = {name for name in archive.namelist() if name.endswith(".py")}
    sources = {
        "selfaugment/" + str(path.relative_to(REPO / "src" / "selfaugment"))
        for path in (REPO / "src" / "selfaugment").rglob("*.py")
    }
    for folder in ("trainer", "operator"):
        sources |= {
            f"selfaugment/{folder}/{path.relative_to(REPO / folder)}"
            for path in (REPO / folder).rglob("*.py")
        }
    assert sources - in_wheel == set(), "modules missing from the wheel (pyproject.toml packages)"
    modules = sorted(
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in in_wheel
        if not name.endswith("__main__.py")
    )
    script = (
        "import importlib, sys\n"
        f"root = {str(unpacked)!r}\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert (getattr(module, '__file__', None) or root).startswith(root), module\n"
        "print(len(sys.modules))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(unpacked)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
