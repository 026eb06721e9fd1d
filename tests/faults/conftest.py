"""Fixtures of the fault tests: the operator's emulated cluster, shared with tests/operator/.

With --import-mode=importlib test directories are not packages, so tests/operator/conftest.py
(the Kubernetes API emulator, the kubelet fixture, moto S3, the operator process) is loaded
from its file here and its fixtures are offered to the tests of this directory too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest


def _load_operator_fixtures() -> Any:
    path = Path(__file__).resolve().parents[1] / "operator" / "conftest.py"
    name = "selfaugment_tests_operator_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_cluster = _load_operator_fixtures()
s3_endpoint = _cluster.s3_endpoint
cluster = _cluster.cluster
operator_env = _cluster.operator_env
operator_process = _cluster.operator_process
kubelet_fake = _cluster.kubelet_fake


@pytest.fixture()
def closed_endpoint() -> str:
    """An S3 endpoint on loopback where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{_cluster.free_port()}"
