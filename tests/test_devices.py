"""Every path that behaves differently on CUDA, written once and parameterised by device.

CI (no GPU) runs the CPU variants; on a machine with CUDA, `pytest -m gpu` runs the same bodies on
`cuda` (benchmarks/gpu-check.sh does, first thing in a session that is lent a GPU). A CUDA variant
on a machine without CUDA fails instead of skipping: `-m gpu` is asked for deliberately.
Tolerances against the CPU fp32 reference are stated per test: TF32/cuDNN kernels differ from
CPU ones in the last bits (fp32), bf16 keeps 8 bits of mantissa.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selfaugment.trainer.config import (
    DatasetConfig,
    EvaluationConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    ProbeConfig,
    RuntimeConfig,
)
from selfaugment.trainer.data import load_dataset
from selfaugment.trainer.evaluation.pretrained import run_pretrain
from selfaugment.trainer.evaluation.probes import train_probe
from selfaugment.trainer.evaluation.scoring import PolicyScorer
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone
from selfaugment.trainer.policy import BatchAugmenter, resolve_policy
from selfaugment.trainer.policy.apply import apply_plan, sample_plan
from selfaugment.trainer.runtime import autocast

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SELFAUGMENT = Path(sys.executable).parent / "selfaugment"
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.fail("CUDA is not available: the gpu-marked variants need a GPU machine")
    return torch.device(request.param)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset(DatasetConfig(uri="sklearn:digits", image_size=16, channels=3)).images


def _moco(seed: int = 0) -> MoCo:
    torch.manual_seed(seed)
    return MoCo(build_backbone(ModelConfig(width=8), 3), MocoConfig(dim=16, queue_size=64))


def _views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    floats = images[:32].float() / 255.0
    return floats, torch.flip(floats, dims=(3,))


@pytest.mark.parametrize(
    ("precision", "tolerance", "min_cosine"),
    [("fp32", 1e-3, 0.99), ("bf16-channels-last", 5e-2, 0.9)],
)
def test_moco_step_matches_the_cpu_fp32_step(
    device: torch.device,
    precision: str,
    tolerance: float,
    min_cosine: float,
    digits: torch.Tensor,
) -> None:
    """One training step on the same batch and weights: the loss is finite and within
    `tolerance` (relative) of CPU fp32, and the gradients point the same way (cosine above
    `min_cosine`; bf16 autocast measured 0.955 on the CPU)."""
    view_q, view_k = _views(digits)
    reference = _moco()
    loss, _ = reference(view_q, view_k)
    loss.backward()
    expected_grad = torch.cat([p.grad.flatten() for p in reference.encoder_q.parameters()])

    model = _moco().to(device)
    bf16 = precision.startswith("bf16")
    memory_format = torch.channels_last if "channels-last" in precision else torch.preserve_format
    model = model.to(memory_format=memory_format)
    inputs = [v.to(device).contiguous(memory_format=memory_format) for v in (view_q, view_k)]
    with autocast(device, bf16):
        loss_on_device, _ = model(*inputs)
    loss_on_device.backward()
    grad = torch.cat([p.grad.flatten().float().cpu() for p in model.encoder_q.parameters()])
    assert torch.isfinite(loss_on_device)
    assert abs(loss_on_device.item() - loss.item()) <= tolerance * abs(loss.item())
    cosine = torch.nn.functional.cosine_similarity(grad, expected_grad, dim=0)
    assert cosine > min_cosine, float(cosine)


def test_batch_augmenter_on_device_matches_cpu_for_the_same_draws(
    device: torch.device, digits: torch.Tensor
) -> None:
    """The same plan (drawn once, on the CPU) applied on the device and on the CPU: at most one
    8-bit level apart anywhere (resampling kernels may round the last bit differently)."""
    policy = resolve_policy("mocov2")
    images = digits[:64].float() / 255.0
    plan = sample_plan(policy, images.shape[0], torch.Generator().manual_seed(3))
    on_cpu = apply_plan(images.clone(), plan, torch.Generator().manual_seed(4))
    on_device = apply_plan(images.to(device), plan, torch.Generator().manual_seed(4)).cpu()
    assert on_device.shape == on_cpu.shape
    assert (on_device - on_cpu).abs().max() <= 1.0 / 255 + 1e-6
    augmenter = BatchAugmenter(policy)  # the whole path on the device, its own generator
    views = augmenter(digits[:64].to(device), torch.Generator(device=device).manual_seed(0))
    assert views.device.type == device.type and views.dtype == torch.float32
    assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0


def test_policy_scorer_on_device_matches_cpu(device: torch.device, digits: torch.Tensor) -> None:
    """Forward-pass scores of the same model, head and (deterministic) views: rotation loss and
    InfoNCE within 1e-3 relative of the CPU scores; the model is left unchanged."""
    model = _moco()
    torch.manual_seed(1)
    head = torch.nn.Linear(model.backbone.feature_dim, 4).state_dict()

    def identity(policy: object) -> object:
        return lambda images, generator: images.float() / 255.0

    def score(on: torch.device) -> tuple[float, float]:
        scorer = PolicyScorer(
            _moco(), head, digits[:96], on, batch_size=32, augmenter_factory=identity
        )
        result = scorer.score(None)
        return result.rotation_loss, result.infonce

    cpu_rotation, cpu_infonce = score(torch.device("cpu"))
    rotation, infonce = score(device)
    assert rotation == pytest.approx(cpu_rotation, rel=1e-3)
    assert infonce == pytest.approx(cpu_infonce, rel=1e-3)


@pytest.mark.parametrize("task", ["rotation", "linear"])
def test_probes_train_on_the_device(device: torch.device, task: str) -> None:
    """Rotation and linear probes on a frozen random backbone learn on the device as on the CPU
    (well above chance: 0.25 rotation, 0.1 linear)."""
    data = load_dataset(DatasetConfig(uri="sklearn:digits", image_size=16, channels=1, limit=600))
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(width=8), 1)
    labels = {}
    if task == "linear":
        assert data.labels is not None
        labels = {
            "train_labels": data.labels[:450],
            "test_labels": data.labels[450:],
            "num_classes": 10,
        }
    result = train_probe(
        backbone,
        task,
        data.images[:450],
        data.images[450:],
        ProbeConfig(epochs=10, batch_size=128, lr=0.1),
        device=device,
        **labels,
    )
    assert result.accuracy > 0.4
    assert all(p.device.type == "cpu" for p in result.head_state.values())


def _pretrain_config(device: str, epochs: int) -> PretrainConfig:
    return PretrainConfig(
        dataset=DatasetConfig(uri="sklearn:digits", image_size=16, channels=1, limit=256),
        model=ModelConfig(width=8),
        moco=MocoConfig(dim=16, queue_size=64),
        optim=OptimConfig(epochs=epochs, batch_size=32, lr=0.05, warmup_epochs=0),
        runtime=RuntimeConfig(device=device, progress=False, checkpoint_every=1),
        evaluation=EvaluationConfig(tasks=[]),
    )


class Stop(Exception):
    pass


def _stop_after_first_epoch(record: dict) -> None:
    raise Stop()


@pytest.mark.parametrize("direction", ["cpu-then-device", "device-then-cpu"])
def test_pretraining_resumes_from_a_checkpoint_written_on_the_other_device(
    device: torch.device, direction: str, tmp_path: Path
) -> None:
    """Epoch 1 on one device (checkpointed, then stopped), epoch 2 resumed on the other."""
    first, second = ("cpu", device.type) if direction == "cpu-then-device" else (device.type, "cpu")
    with pytest.raises(Stop):
        run_pretrain(
            _pretrain_config(first, 2), tmp_path, progress_callback=_stop_after_first_epoch
        )
    report = run_pretrain(_pretrain_config(second, 2), tmp_path)  # runtime.device: same run
    assert report["epochs"] == 2 and len(report["loss_history"]) == 2
    assert all(torch.isfinite(torch.tensor(report["loss_history"])))


@pytest.mark.parametrize("processes", [1, 2])
def test_pretrain_cli_under_torchrun(device: torch.device, processes: int, tmp_path: Path) -> None:
    """`torchrun --standalone --nproc_per_node N -m selfaugment.cli pretrain`: NCCL on CUDA
    (N = 2 needs 2 GPUs), gloo on the CPU. One checkpoint and one pretrain.json, from rank 0."""
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        pytest.fail(f"{processes} processes need {processes} GPUs")
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_pretrain_config(device.type, 1).model_dump(mode="json")))
    done = subprocess.run(
        [
            str(TORCHRUN),
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "selfaugment.cli",
            "pretrain",
            "-f",
            str(config),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert report["epochs"] == 1 and (tmp_path / "out" / "checkpoint.pt").exists()


def test_worker_honours_cuda_visible_devices(device: torch.device, tmp_path: Path) -> None:
    """As the local runner starts workers: CUDA_VISIBLE_DEVICES="" means the CPU, "0" the first
    GPU; `runtime.device: auto` follows it."""
    visible = "0" if device.type == "cuda" else ""
    probe = "from selfaugment.trainer.runtime import resolve_device; print(resolve_device('auto'))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": visible},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("cuda:0" if device.type == "cuda" else "cpu")


def test_out_of_memory_is_one_line_naming_the_batch_size(
    device: torch.device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA a real out-of-memory error (the process limited to a sliver of the GPU's
    memory); on the CPU, where an allocation failure cannot be provoked safely, the step raises
    torch.OutOfMemoryError as CUDA would (a stand-in for the GPU, said here)."""
    from selfaugment.trainer.moco.pretrain import PretrainError

    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1e-4, device)
    else:

        def out_of_memory(*args: object, **kwargs: object) -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(MoCo, "forward", out_of_memory)
    cfg = _pretrain_config(device.type, 1)
    try:
        with pytest.raises(PretrainError) as raised:
            run_pretrain(cfg, tmp_path)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
    message = str(raised.value)
    assert "out of memory" in message and "optim.batch_size=32" in message
    assert "\n" not in message


@pytest.mark.slow
def test_gpu_check_script_runs_its_cpu_fallback_end_to_end(tmp_path: Path) -> None:
    """benchmarks/gpu-check.sh without CUDA: every step (the CPU variants of this file's tests,
    the MoCo, scoring and augmentation benchmarks) runs and writes its results where told."""
    if torch.cuda.is_available():
        pytest.fail("this is the fallback's test: run it where CUDA is absent")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu-check.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "gpu-check (cpu): 0 failed step(s)" in done.stdout
    for name in ("moco-cpu.json", "scoring-cpu.json", "augment-cpu.json", "gpu-check-cpu.log"):
        assert (tmp_path / name).stat().st_size > 0, name
