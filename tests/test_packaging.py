"""Packaging: what the images install agrees with pyproject.toml."""

from __future__ import annotations

import sys
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
