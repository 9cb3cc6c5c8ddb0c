import math

import pytest
import torch
import torch.nn.functional as F

from tricoclr.losses import contrastive_logits, infonce_loss, multi_positive_loss

TAU = 0.5


def hand_batch():
    """2 queries, 2 keys and a queue of 4 unit vectors in 2D, chosen so every dot product is
    exact: q·k = 0.6 for both rows, q·queue in {-1, 0, 1}."""
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    key = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    return query, key, queue


def test_contrastive_logits_hand_values():
    query, key, queue = hand_batch()
    logits = contrastive_logits(query, key, queue, TAU)
    expected = torch.tensor([[1.2, 2.0, 0.0, -2.0, 0.0], [1.2, 0.0, 2.0, 0.0, -2.0]])
    torch.testing.assert_close(logits, expected)


def test_infonce_hand_value():
    query, key, queue = hand_batch()
    # Both rows hold the same multiset of logits {1.2, 2, 0, -2, 0} with 1.2 as the target.
    row = -1.2 + math.log(math.exp(1.2) + math.exp(2.0) + 2.0 + math.exp(-2.0))
    assert infonce_loss(query, key, queue, TAU).item() == pytest.approx(row, rel=1e-6)


def test_empty_queue_gives_only_the_positive_logit_and_zero_loss():
    query, key, _ = hand_batch()
    empty = torch.zeros(0, 2)
    logits = contrastive_logits(query, key, empty, TAU)
    assert logits.shape == (2, 1)
    torch.testing.assert_close(logits, torch.tensor([[1.2], [1.2]]))
    assert infonce_loss(query, key, empty, TAU).item() == 0.0


def test_no_gradient_reaches_key_or_queue():
    query, key, queue = hand_batch()
    query.requires_grad_(True)
    key.requires_grad_(True)
    queue.requires_grad_(True)
    infonce_loss(query, key, queue, TAU).backward()
    assert query.grad is not None
    assert key.grad is None and queue.grad is None


def test_multi_positive_hand_value():
    query, key, queue = hand_batch()
    logits = contrastive_logits(query, key, queue, TAU)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, [0, 1]] = True  # row 0: key and queue entry 0 (logit 2)
    mask[1, [2]] = True  # row 1: only queue entry 1 (logit 2), key not a positive
    z = math.exp(1.2) + math.exp(2.0) + 2.0 + math.exp(-2.0)
    row0 = -math.log((math.exp(1.2) + math.exp(2.0)) / z)
    row1 = -math.log(math.exp(2.0) / z)
    assert multi_positive_loss(logits, mask).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_multi_positive_with_only_the_key_equals_infonce():
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(6, 8, generator=generator), dim=1)
    key = F.normalize(torch.randn(6, 8, generator=generator), dim=1)
    queue = F.normalize(torch.randn(10, 8, generator=generator), dim=1)
    logits = contrastive_logits(query, key, queue, 0.07)
    key_only = torch.zeros_like(logits, dtype=torch.bool)
    key_only[:, 0] = True
    torch.testing.assert_close(multi_positive_loss(logits, key_only), infonce_loss(query, key, queue, 0.07))


def test_all_columns_positive_gives_zero_loss():
    logits = torch.randn(3, 7)
    assert multi_positive_loss(logits, torch.ones(3, 7, dtype=torch.bool)).abs().item() < 1e-6


def test_row_without_positive_is_rejected():
    logits = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_loss(logits, mask)
    with pytest.raises(ValueError, match="does not match"):
        multi_positive_loss(logits, mask[:, :2])


def test_multi_positive_is_stable_for_extreme_logits():
    # Naive -log(sum(softmax * mask)) gives inf here: the positive's probability underflows.
    logits = torch.tensor([[-1000.0, 1000.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, False, False]])
    loss = multi_positive_loss(logits, mask)
    assert loss.item() == pytest.approx(2000.0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # The gradient is softmax minus the positives' normalised share.
    torch.testing.assert_close(logits.grad, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_gradient_steps_lower_the_multi_positive_loss():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(4, 8, generator=generator, requires_grad=True)
    key = F.normalize(torch.randn(4, 8, generator=generator), dim=1)
    queue = F.normalize(torch.randn(16, 8, generator=generator), dim=1)
    mask = torch.zeros(4, 17, dtype=torch.bool)
    mask[:, 0] = True
    mask[:, 1:3] = True
    optimizer = torch.optim.SGD([query], lr=0.5)
    losses = []
    for _ in range(5):
        loss = multi_positive_loss(contrastive_logits(F.normalize(query, dim=1), key, queue, 0.2), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_low_precision_inputs_give_a_float32_loss():
    query, key, queue = hand_batch()
    loss = infonce_loss(query.bfloat16(), key, queue, TAU)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(infonce_loss(query, key, queue, TAU).item(), rel=1e-2)
