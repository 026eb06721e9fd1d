"""Losses as pure functions: InfoNCE with a queue of negatives (MoCo, He et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of queries against their positive keys and a queue of negatives.

    q: NxC normalised queries, k: NxC normalised positive keys, queue: CxK normalised negatives.
    Returns (mean cross-entropy loss, logits Nx(1+K)); the positive is logit column 0.
    Computed in float32 even under autocast, so that bf16 does not blur the logits.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be NxC, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[0] != q.shape[1]:
        raise ValueError(f"queue must be CxK with C={q.shape[1]}, got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q, k, queue = q.float(), k.float(), queue.float()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # NxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # Nx(1+K)
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)  # positives: col 0
    return F.cross_entropy(logits, targets), logits
