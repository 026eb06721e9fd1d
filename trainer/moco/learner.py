"""MoCo v2 (He et al. 2020, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297).

A query encoder (backbone + projection head) is trained by SGD; the key encoder is its
momentum-averaged copy; a queue of past keys supplies the negatives of InfoNCE.

Shuffle-BN: with more than one process (DDP) keys are computed on a batch shuffled across
ranks, as in MoCo, so that batch-norm statistics cannot leak which key matches which query.
On a single device no shuffle is done (shuffling within one batch leaves BN statistics
unchanged); BN is per-encoder, and the key encoder runs on the second view, which is the
usual single-GPU MoCo setting.

`forward` is the training step (momentum update + enqueue); `contrastive_loss_eval` scores
views with every parameter and buffer left bit-identical: no momentum update, no enqueue, both
encoders in eval mode (the reference SelfAugment code kept updating its key encoder there).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfaugment.trainer.config import MocoConfig
from selfaugment.trainer.moco.losses import info_nce
from selfaugment.trainer.moco.models import ResNetBackbone, forward_in_chunks
from selfaugment.trainer.runtime import concat_all_gather, distributed_active


class QueryEncoder(nn.Module):
    """Backbone followed by the projection head (MLP D->D->dim with ReLU, or linear D->dim)."""

    def __init__(
        self, backbone: ResNetBackbone, dim: int, mlp: bool, batchnorm: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        feature_dim = backbone.feature_dim
        self.head: nn.Module = nn.Linear(feature_dim, dim)
        if mlp:
            hidden: list[nn.Module] = [nn.Linear(feature_dim, feature_dim)]
            if batchnorm:
                hidden.append(nn.BatchNorm1d(feature_dim))
            self.head = nn.Sequential(*hidden, nn.ReLU(), nn.Linear(feature_dim, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))  # B x dim (not normalised)


class MoCo(nn.Module):
    """MoCo v2 learner: `forward(view_q, view_k)` returns (loss, logits) and updates key + queue."""

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: ResNetBackbone, cfg: MocoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.momentum = cfg.momentum
        self.temperature = cfg.temperature
        self.encoder_q = QueryEncoder(backbone, cfg.dim, cfg.mlp, cfg.head_batchnorm)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param in self.encoder_k.parameters():
            param.requires_grad = False
        queue = F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0)  # C x K
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # DDP wrapper of encoder_q, kept out of the module tree so state_dict keys stay stable.
        self._query_runner: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def backbone(self) -> ResNetBackbone:
        backbone = self.encoder_q.backbone
        if not isinstance(backbone, ResNetBackbone):
            raise TypeError("encoder_q.backbone is not a ResNetBackbone")
        return backbone

    def set_query_runner(self, runner: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Run the query encoder through `runner` (e.g. a DDP wrapper of encoder_q)."""
        object.__setattr__(self, "_query_runner", runner)

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q (parameters only, as in MoCo)."""
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True
        ):
            param_k.mul_(self.momentum).add_(param_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write NxC keys into the CxK queue at queue_ptr, wrapping around its end."""
        queue_size = self.queue.shape[1]
        keys = keys.detach().to(self.queue.dtype)[-queue_size:]  # at most K newest keys
        count = keys.shape[0]
        ptr = int(self.queue_ptr.item())
        slots = (ptr + torch.arange(count, device=self.queue.device)) % queue_size
        self.queue[:, slots] = keys.T
        self.queue_ptr[0] = (ptr + count) % queue_size

    def encode_query(self, images: torch.Tensor) -> torch.Tensor:
        runner = self._query_runner if self._query_runner is not None else self.encoder_q
        return F.normalize(runner(images), dim=1)  # N x C

    @torch.no_grad()
    def encode_key(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised keys; batch shuffled across ranks (shuffle-BN) when distributed."""
        if self.training and distributed_active():
            shuffled, restore = _batch_shuffle_ddp(images)
            return _batch_unshuffle_ddp(F.normalize(self.encoder_k(shuffled), dim=1), restore)
        return F.normalize(self.encoder_k(images), dim=1)  # N x C

    def forward(
        self, view_q: torch.Tensor, view_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training step on two views [N, C, H, W]: returns (loss, logits Nx(1+K))."""
        q = self.encode_query(view_q)  # N x C
        with torch.no_grad():
            if self.training:
                self.momentum_update_key_encoder()
            k = self.encode_key(view_k)  # N x C
        loss, logits = info_nce(q, k, self.queue.clone().detach(), self.temperature)
        if self.training:
            self.enqueue(concat_all_gather(k))
        return loss, logits

    @torch.no_grad()
    def contrastive_loss_eval(
        self,
        view_q: torch.Tensor | None,
        view_k: torch.Tensor,
        *,
        query_features: torch.Tensor | None = None,
        chunk: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of two views with frozen encoders and queue: changes no parameter or buffer.

        `query_features`: the query backbone's output for `view_q`, when the caller has it (the
        policy scorer computes it for the rotation head), so the backbone does not run again.
        `chunk`: run the encoders this many images at a time (models.inference_chunk)."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            if query_features is None:
                if view_q is None:
                    raise ValueError("contrastive_loss_eval needs view_q or query_features")
                query_features = forward_in_chunks(
                    self.encoder_q.backbone, view_q, chunk or view_q.shape[0]
                )
            q = F.normalize(self.encoder_q.head(query_features), dim=1)  # N x C
            keys = forward_in_chunks(self.encoder_k, view_k, chunk or view_k.shape[0])
            k = F.normalize(keys, dim=1)  # N x C
            return info_nce(q, k, self.queue, self.temperature)
        finally:
            for module, mode in modes:
                module.training = mode


@torch.no_grad()
def _batch_shuffle_ddp(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the global batch, apply one permutation shared by all ranks, keep this rank's part."""
    local_size = images.shape[0]
    gathered = concat_all_gather(images)  # (world*N) x ...
    permutation = torch.randperm(gathered.shape[0], device=images.device)
    dist.broadcast(permutation, src=0)
    restore = torch.argsort(permutation)
    rank = dist.get_rank()
    mine = permutation.view(-1, local_size)[rank]
    return gathered[mine], restore


@torch.no_grad()
def _batch_unshuffle_ddp(keys: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
    """Undo _batch_shuffle_ddp for the keys computed on the shuffled batch."""
    local_size = keys.shape[0]
    gathered = concat_all_gather(keys)
    return gathered[restore.view(-1, local_size)[dist.get_rank()]]
