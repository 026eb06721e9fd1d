"""MoCo v2: momentum update, queue, training step and the side-effect-free evaluation path."""

import pytest
import torch
import torch.nn.functional as F

from selfaugment.trainer.config import MocoConfig, ModelConfig
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone


def _tiny_moco(queue_size: int = 64, momentum: float = 0.99, seed: int = 0) -> MoCo:
    torch.manual_seed(seed)
    backbone = build_backbone(ModelConfig(width=8), 3)
    return MoCo(backbone, MocoConfig(dim=16, queue_size=queue_size, momentum=momentum))


def _state(model: MoCo) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_structure_and_initial_state() -> None:
    model = _tiny_moco()
    assert model.queue.shape == (16, 64)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(64))
    assert all(not param.requires_grad for param in model.encoder_k.parameters())
    for param_q, param_k in zip(
        model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True
    ):
        assert torch.equal(param_q, param_k)
    assert isinstance(model.encoder_q.head, torch.nn.Sequential)  # MLP head of MoCo v2


def test_momentum_update_math() -> None:
    model = _tiny_moco(momentum=0.9)
    with torch.no_grad():
        for param in model.encoder_q.parameters():
            param.fill_(1.0)
        for param in model.encoder_k.parameters():
            param.fill_(3.0)
    model.momentum_update_key_encoder()
    for param in model.encoder_k.parameters():
        torch.testing.assert_close(param, torch.full_like(param, 0.9 * 3.0 + 0.1 * 1.0))


def test_queue_pointer_wraps_around() -> None:
    model = _tiny_moco(queue_size=16)
    first = F.normalize(torch.randn(10, 16), dim=1)
    second = F.normalize(torch.randn(10, 16), dim=1)
    model.enqueue(first)
    assert int(model.queue_ptr) == 10
    model.enqueue(second)
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.queue[:, 10:16], second[:6].T)
    torch.testing.assert_close(model.queue[:, 0:4], second[6:].T)
    torch.testing.assert_close(model.queue[:, 4:10], first[4:10].T)
    many = F.normalize(torch.randn(20, 16), dim=1)  # more keys than slots: newest 16 kept
    model.enqueue(many)
    assert int(model.queue_ptr) == 4
    assert {tuple(c.tolist()) for c in model.queue.T} == {tuple(r.tolist()) for r in many[4:]}


def test_training_step_updates_key_encoder_and_queue_only_in_training() -> None:
    model = _tiny_moco(queue_size=32)
    views = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    model.train()
    key_before = [p.clone() for p in model.encoder_k.parameters()]
    with torch.no_grad():  # move the query encoder so that the momentum update is visible
        for param in model.encoder_q.parameters():
            param.add_(0.01)
    loss, logits = model(*views)
    assert logits.shape == (8, 33) and loss.requires_grad
    assert int(model.queue_ptr) == 8
    assert any(
        not torch.equal(a, b) for a, b in zip(key_before, model.encoder_k.parameters(), strict=True)
    )
    model.eval()
    before = _state(model)
    model(*views)
    after = _state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_eval_path_is_bit_identical_and_matches_eval_forward() -> None:
    model = _tiny_moco()
    model.train()
    views = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    model(*views)  # one real step so that BN statistics and the queue are not pristine
    before = _state(model)
    loss, logits = model.contrastive_loss_eval(*views)
    for _ in range(2):
        model.contrastive_loss_eval(*views)
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.training and model.encoder_k.training  # modes restored
    model.eval()
    with torch.no_grad():
        eval_loss, eval_logits = model(*views)
    torch.testing.assert_close(loss, eval_loss)
    torch.testing.assert_close(logits, eval_logits)


@pytest.mark.dynamics
def test_loss_goes_down_over_20_steps_on_a_fixed_batch() -> None:
    model = _tiny_moco(queue_size=512)
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(16, 3, 16, 16, generator=generator)
    view_q = (images + 0.1 * torch.rand(16, 3, 16, 16, generator=generator)).clamp(0, 1)
    view_k = torch.flip(images, dims=(3,))
    negatives = model.queue.clone()  # the initial random queue, kept fixed
    optimizer = torch.optim.SGD(
        [p for p in model.encoder_q.parameters() if p.requires_grad], lr=0.05, momentum=0.9
    )
    model.train()
    train_losses = []
    for _ in range(20):
        loss, _ = model(view_q, view_k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_losses.append(loss.item())
        # On one repeated batch the queue would fill with stale copies of the positives (hard
        # negatives by construction); keep the random negatives to measure learning alone.
        with torch.no_grad():
            model.queue.copy_(negatives)
    print(f"MoCo fixed batch: train loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f}")
    assert train_losses[-1] < train_losses[0] - 0.5


def test_queries_carry_gradient_and_keys_do_not() -> None:
    model = _tiny_moco()
    images = torch.rand(4, 3, 16, 16)
    assert model.encode_query(images).requires_grad
    assert not model.encode_key(images).requires_grad
    with pytest.raises(TypeError):
        model.encoder_q.backbone = torch.nn.Identity()  # type: ignore[assignment]
        _ = model.backbone
