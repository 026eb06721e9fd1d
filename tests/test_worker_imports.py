"""What a worker process imports: never torchvision, and not ``torch._dynamo`` on import.

The local runner and the operator start one process per task and a search runs dozens of short
tasks, so import time is paid on every task. Importing torchvision imports its models and ops
and through them ``torch._dynamo`` (about 1.6 s on a 2-core machine); the worker path uses
neither (the backbone and the resize are written on torch alone). torchvision stays a
dependency for the ``torchvision:`` datasets, which import it only when they are read.

``torch.optim`` optimizers still import ``torch._dynamo`` when the first one is built (torch
wraps ``Optimizer.add_param_group`` in ``torch._disable_dynamo``); that happens in the tasks that
train, not on import, and is torch's, so only the import is checked here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WORKER_MODULES = (
    "selfaugment.cli",
    "selfaugment.trainer.search.tasks",
    "selfaugment.trainer.search.stages",
    "selfaugment.trainer.search.pretrain_job",
    "selfaugment.trainer.evaluation.scoring",
    "selfaugment.trainer.evaluation.probes",
    "selfaugment.trainer.moco.pretrain",
    "selfaugment.trainer.moco.checkpoint",
    "selfaugment.trainer.data",
)

_BLOCK_TORCHVISION = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise ImportError(f"{name} is not installed in this test")
sys.meta_path.insert(0, _Blocked())
"""


# The last line of each script: which of the modules the workers must not load were loaded.
_REPORT_LOADED = (
    "print('loaded', sorted(m for m in sys.modules "
    "if m.startswith(('torchvision', 'torch._dynamo'))))\n"
)


def _assert_nothing_loaded(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded []" in done.stdout, done.stdout


def _run(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_worker_modules_import_neither_torchvision_nor_dynamo(tmp_path: Path) -> None:
    script = (
        "import importlib, sys\n"
        f"for name in {WORKER_MODULES!r}:\n"
        "    importlib.import_module(name)\n" + _REPORT_LOADED
    )
    _assert_nothing_loaded(_run(script, tmp_path))


def test_backbone_and_image_preparation_run_without_torchvision(tmp_path: Path) -> None:
    """With torchvision unimportable: build and run the backbone (both block kinds), resize and
    crop arrays, downscale a stored sample and a large image file."""
    script = _BLOCK_TORCHVISION + (
        "import io\n"
        "import numpy as np, torch\n"
        "from PIL import Image\n"
        "from selfaugment.trainer.config import ModelConfig\n"
        "from selfaugment.trainer.data.codec import encode_array, encode_file\n"
        "from selfaugment.trainer.data.convert import prepare_images\n"
        "from selfaugment.trainer.moco.models import build_backbone\n"
        "for arch in ('resnet18', 'resnet50'):\n"
        "    model = build_backbone(ModelConfig(arch=arch, width=4), 3).eval()\n"
        "    with torch.no_grad():\n"
        "        assert model(torch.rand(2, 3, 16, 16)).shape == (2, model.feature_dim)\n"
        "images = np.random.default_rng(0).integers(0, 256, (3, 40, 30), dtype=np.uint8)\n"
        "assert prepare_images(images, 16, 3, 'test').shape == (3, 3, 16, 16)\n"
        "assert encode_array(images[:1], 20).downscaled\n"
        "buffer = io.BytesIO()\n"
        "Image.fromarray(np.zeros((64, 48, 3), np.uint8)).save(buffer, format='PNG')\n"
        "assert encode_file(buffer.getvalue(), '.png', 24, 'png', 90).downscaled\n" + _REPORT_LOADED
    )
    _assert_nothing_loaded(_run(script, tmp_path))
