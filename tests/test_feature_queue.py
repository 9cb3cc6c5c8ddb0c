import pytest
import torch

from tricoclr.feature_queue import FeatureQueue


def rows(values, dim):
    """(n, dim) keys whose every entry of row i is values[i]: easy to recognise in the queue."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1).repeat(1, dim)


def test_initial_state_is_random_unit_keys_and_no_entries():
    queue = FeatureQueue(size=4, dim=3, oracle_dim=2)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(4))
    assert torch.equal(queue.oracle, torch.zeros(4, 2))
    assert queue.video_ids.tolist() == [-1] * 4 and queue.labels.tolist() == [-1] * 4
    assert not queue.is_full and queue.fill_fraction == 0.0 and int(queue.ptr) == 0


def test_enqueue_writes_in_fifo_order_and_wraps_around():
    queue = FeatureQueue(size=4, dim=2, oracle_dim=1)
    queue.enqueue(rows([1, 2, 3], 2), oracle=rows([10, 20, 30], 1), video_ids=torch.tensor([1, 2, 3]))
    assert queue.keys[:3, 0].tolist() == [1, 2, 3]
    assert int(queue.ptr) == 3 and queue.fill_fraction == 0.75 and not queue.is_full
    queue.enqueue(
        rows([4, 5, 6], 2),
        oracle=rows([40, 50, 60], 1),
        video_ids=torch.tensor([4, 5, 6]),
        labels=torch.tensor([0, 1, 2]),
    )
    # Slot 3 gets 4, then the oldest two (1, 2) are overwritten by 5, 6.
    assert queue.keys[:, 0].tolist() == [5, 6, 3, 4]
    assert queue.keys[:, 1].tolist() == [5, 6, 3, 4]
    assert queue.oracle[:, 0].tolist() == [50, 60, 30, 40]
    assert queue.video_ids.tolist() == [5, 6, 3, 4]
    assert queue.labels.tolist() == [1, 2, -1, 0]
    assert int(queue.ptr) == 2 and queue.is_full and queue.fill_fraction == 1.0


def test_a_batch_longer_than_the_queue_keeps_its_last_entries():
    queue = FeatureQueue(size=4, dim=1)
    queue.enqueue(rows([1], 1))
    queue.enqueue(rows([2, 3, 4, 5, 6, 7], 1), video_ids=torch.arange(2, 8))
    # Writing starts at slot 1 (ptr) with the last four entries 4..7.
    assert queue.keys[:, 0].tolist() == [7, 4, 5, 6]
    assert queue.video_ids.tolist() == [7, 4, 5, 6]
    assert int(queue.ptr) == 1 and queue.is_full


def test_enqueue_detaches_and_casts():
    queue = FeatureQueue(size=3, dim=2)
    keys = torch.ones(2, 2, requires_grad=True)
    queue.enqueue(keys.bfloat16() * 0.5)
    assert queue.keys.dtype == torch.float32 and not queue.keys.requires_grad
    assert queue.keys[:2].tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_state_dict_round_trip_restores_every_buffer():
    queue = FeatureQueue(size=5, dim=3, oracle_dim=4)
    queue.enqueue(
        torch.randn(3, 3), oracle=torch.randn(3, 4), video_ids=torch.tensor([9, 8, 7]), labels=torch.tensor([1, 1, 0])
    )
    state = queue.state_dict()
    assert set(state) == {"keys", "oracle", "video_ids", "labels", "ptr", "num_filled"}
    restored = FeatureQueue(size=5, dim=3, oracle_dim=4)
    restored.load_state_dict(state)
    for name, tensor in state.items():
        assert torch.equal(getattr(restored, name), tensor), name
    assert restored.fill_fraction == pytest.approx(0.6)


def test_reset_gives_fresh_queues():
    queue = FeatureQueue(size=2, dim=2, oracle_dim=2)
    queue.enqueue(torch.ones(2, 2), oracle=torch.ones(2, 2), video_ids=torch.tensor([1, 2]))
    assert queue.is_full
    queue.reset(generator=torch.Generator().manual_seed(0))
    assert not queue.is_full and int(queue.ptr) == 0
    assert queue.video_ids.tolist() == [-1, -1] and torch.equal(queue.oracle, torch.zeros(2, 2))
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(2))


def test_oracle_dim_zero_and_shape_checks():
    queue = FeatureQueue(size=3, dim=2)
    assert queue.oracle.shape == (3, 0)
    queue.enqueue(torch.ones(1, 2))
    with pytest.raises(ValueError, match="keys"):
        queue.enqueue(torch.ones(1, 3))
    with_oracle = FeatureQueue(size=3, dim=2, oracle_dim=4)
    with pytest.raises(ValueError, match="oracle"):
        with_oracle.enqueue(torch.ones(1, 2))
    with pytest.raises(ValueError, match="oracle"):
        with_oracle.enqueue(torch.ones(1, 2), oracle=torch.ones(1, 3))
