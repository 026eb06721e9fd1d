"""InfoNCE: against a naive per-sample loop, input checks, and a 20-step descent."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfaugment.trainer.moco.losses import info_nce


def _naive_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        positive = math.exp(float(q[i] @ k[i]) / t)
        negatives = sum(math.exp(float(q[i] @ queue[:, j]) / t) for j in range(queue.shape[1]))
        total += -math.log(positive / (positive + negatives))
    return total / q.shape[0]


def test_matches_naive_loop() -> None:
    generator = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(8, 11, generator=generator, dtype=torch.float64), dim=0)
    loss, logits = info_nce(q, k, queue, temperature=0.2)
    assert logits.shape == (6, 12)
    assert loss.item() == pytest.approx(_naive_info_nce(q, k, queue, 0.2), rel=1e-5)
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1).float() / 0.2)


def test_rejects_mismatched_shapes() -> None:
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="q and k"):
        info_nce(q, torch.randn(4, 7), torch.randn(8, 5), 0.2)
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, q, torch.randn(7, 5), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, torch.randn(8, 5), 0.0)


@pytest.mark.dynamics
def test_loss_goes_down_in_20_steps() -> None:
    generator = torch.Generator().manual_seed(0)
    raw_q = torch.randn(16, 8, generator=generator).requires_grad_()
    k = F.normalize(torch.randn(16, 8, generator=generator), dim=1)
    queue = F.normalize(torch.randn(8, 64, generator=generator), dim=0)
    optimizer = torch.optim.SGD([raw_q], lr=5.0)
    losses = []
    for _ in range(20):
        loss, _ = info_nce(F.normalize(raw_q, dim=1), k, queue, 0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
