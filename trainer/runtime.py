"""Runtime helpers: device and precision choice, seeding, RNG state capture, DDP plumbing."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from selfaugment.environ import env_int
from selfaugment.trainer.config import RuntimeConfig


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env_from_environ() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun."""
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world_size}")
    return DistEnv(rank=rank, world_size=world_size, local_rank=env_int("LOCAL_RANK", rank))


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the local rank's CUDA device when present, else CPU; 'cuda' -> cuda:local_rank."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"runtime.device: not a device: {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device: {spec!r} asked for, but CUDA is not available")
    return device


def init_distributed(device: torch.device, env: DistEnv) -> None:
    """Join the process group of a torchrun job (nccl on CUDA, gloo on CPU); no-op for 1 process."""
    if not env.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def distributed_active() -> bool:
    """True when a process group with more than one member is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def use_bf16(cfg: RuntimeConfig, device: torch.device) -> bool:
    """bf16 autocast: 'auto' turns it on for CUDA only; 'bf16' forces it (CPU included)."""
    if cfg.precision == "auto":
        return device.type == "cuda"
    return cfg.precision == "bf16"


def use_channels_last(cfg: RuntimeConfig, device: torch.device) -> bool:
    """channels_last memory format: default on for CUDA, off for CPU."""
    return device.type == "cuda" if cfg.channels_last is None else cfg.channels_last


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on `device` when enabled, a no-op otherwise."""
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU, CUDA and `generator`, as checkpoint-safe values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(v) for v in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of capture_rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": np.array(numpy_state["key"], dtype=np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0 (no gradient); identity when not distributed."""
    if not distributed_active():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (a copy); identity when not distributed."""
    if not distributed_active():
        return value
    reduced = value.detach().clone()
    dist.all_reduce(reduced)
    return reduced / dist.get_world_size()


def barrier() -> None:
    """Wait for all ranks; no-op when not distributed."""
    if distributed_active():
        dist.barrier()
