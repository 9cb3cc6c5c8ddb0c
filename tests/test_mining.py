import pytest
import torch
import torch.nn.functional as F

from tricoclr.losses import contrastive_logits, infonce_loss, multi_positive_loss
from tricoclr.mining import mask_self_positive, mine_positives, mined_precision


def mask_of(rows, width):
    """Bool mask (len(rows), width) with True at the listed columns of each row."""
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, columns in enumerate(rows):
        mask[row, list(columns)] = True
    return mask


def random_batch(batch=3, queue=6, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    key = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    queue_keys = F.normalize(torch.randn(queue, dim, generator=generator), dim=1)
    return query, key, queue_keys


# ---- the reductions M = 1, 2, 3 ----------------------------------------------------------------


def test_m1_without_oracle_reduces_to_infonce():
    query, key, queue_keys = random_batch()
    # M = 1: the queue stores oracle vectors with D_o = 0.
    mask = mine_positives(torch.zeros(3, 0), torch.zeros(6, 0), k=5, queue_full=True)
    assert torch.equal(mask, mask_of([[0], [0], [0]], 7))
    loss = multi_positive_loss(contrastive_logits(query, key, queue_keys, 0.07), mask)
    torch.testing.assert_close(loss, infonce_loss(query, key, queue_keys, 0.07))
    # Same with no oracle at all (sizes from the video ids).
    mask = mine_positives(None, None, video_ids=torch.arange(3), queue_video_ids=torch.arange(10, 16))
    assert torch.equal(mask, mask_of([[0], [0], [0]], 7))


def test_m2_oracle_top_k_picks_the_most_similar_queue_entries():
    # One sampler: oracle vectors are unit vectors in 2D.
    oracle = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue_oracle = torch.tensor([[0.0, 1.0], [0.8, 0.6], [1.0, 0.0], [-0.6, 0.8]])
    # Row 0 similarities: [0, 0.8, 1, -0.6] -> top 2 = entries 2, 1.
    # Row 1 similarities: [1, 0.6, 0, 0.8]  -> top 2 = entries 0, 3.
    mask = mine_positives(oracle, queue_oracle, k=2)
    assert torch.equal(mask, mask_of([[0, 3, 2], [0, 1, 4]], 5))


def test_m3_concatenated_oracle_mines_an_entry_neither_sampler_alone_would():
    # Two samplers a and b; the anchor's parts are a = b = (1, 0).
    anchor_a = torch.tensor([[1.0, 0.0]])
    anchor_b = torch.tensor([[1.0, 0.0]])
    # Queue parts (each unit norm): cos_a, cos_b with the anchor
    #   entry 0 "Y": 1.0, 0.0   (best for sampler a alone)
    #   entry 1 "Z": 0.0, 1.0   (best for sampler b alone)
    #   entry 2 "X": 0.8, 0.8   (second for each, best in sum: 1.6)
    #   entry 3 "W": -1, -1
    queue_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]])
    queue_b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])

    only_a = mine_positives(anchor_a, queue_a, k=1)
    only_b = mine_positives(anchor_b, queue_b, k=1)
    together = mine_positives(torch.cat([anchor_a, anchor_b], 1), torch.cat([queue_a, queue_b], 1), k=1)
    assert torch.equal(only_a, mask_of([[0, 1]], 5))
    assert torch.equal(only_b, mask_of([[0, 2]], 5))
    assert torch.equal(together, mask_of([[0, 3]], 5))


# ---- mine_positives details ----------------------------------------------------------------------


def test_k_larger_than_the_queue_is_clamped():
    mask = mine_positives(torch.ones(2, 3), torch.ones(4, 3), k=10)
    assert mask.shape == (2, 5) and mask.all()


def test_k_zero_mines_nothing():
    assert torch.equal(mine_positives(torch.ones(2, 3), torch.ones(4, 3), k=0), mask_of([[0], [0]], 5))


def test_no_oracle_mining_before_the_queue_is_full():
    oracle = torch.tensor([[1.0, 0.0]])
    queue_oracle = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(mine_positives(oracle, queue_oracle, k=1, queue_full=False), mask_of([[0]], 3))


def test_same_video_entries_are_positives_and_excluded_from_the_top_k():
    oracle = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue_oracle = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    video_ids = torch.tensor([7, 8])
    queue_video_ids = torch.tensor([7, 3, 4, 7])
    mask = mine_positives(
        oracle, queue_oracle, k=1,
        video_ids=video_ids, queue_video_ids=queue_video_ids, same_video_positives=True,
    )
    # Row 0: entries 0 and 3 are its video; the top-1 among the others is entry 1 (0.8), not
    # entry 0 (1.0, already positive). Row 1: no same-video entry; top-1 is entry 2.
    assert torch.equal(mask, mask_of([[0, 1, 4, 2], [0, 3]], 5))
    # Without the flag, video ids are ignored: row 0's top-1 is entry 0.
    plain = mine_positives(oracle, queue_oracle, k=1, video_ids=video_ids, queue_video_ids=queue_video_ids)
    assert torch.equal(plain, mask_of([[0, 1], [0, 3]], 5))


def test_same_video_positives_apply_before_the_queue_is_full_and_ignore_unfilled_slots():
    video_ids = torch.tensor([5, -1])  # -1: unknown video
    queue_video_ids = torch.tensor([5, -1, -1, 2])  # -1: unfilled slots
    mask = mine_positives(
        torch.ones(2, 3), torch.ones(4, 3), k=2,
        video_ids=video_ids, queue_video_ids=queue_video_ids,
        same_video_positives=True, queue_full=False,
    )
    assert torch.equal(mask, mask_of([[0, 1], [0]], 5))


def test_same_video_positives_need_the_ids():
    with pytest.raises(ValueError, match="video_ids"):
        mine_positives(torch.ones(2, 3), torch.ones(4, 3), same_video_positives=True)
    with pytest.raises(ValueError, match="batch and queue sizes"):
        mine_positives(None, None)


def test_mining_returns_a_mask_on_the_oracle_device_without_grad():
    oracle = torch.randn(2, 3, requires_grad=True)
    mask = mine_positives(oracle, torch.randn(4, 3), k=2)
    assert mask.dtype == torch.bool and not mask.requires_grad
    assert mask.sum(dim=1).tolist() == [3, 3]


# ---- mask_self_positive --------------------------------------------------------------------------


def test_mask_self_positive_drops_the_key_only_where_other_positives_exist():
    mask = mask_of([[0, 2], [0], [0, 1, 3]], 4)
    original = mask.clone()
    dropped = mask_self_positive(mask, probability=1.0)
    assert torch.equal(dropped, mask_of([[2], [0], [1, 3]], 4))
    assert torch.equal(mask, original)  # pure: the input is untouched
    assert torch.equal(mask_self_positive(mask, probability=0.0), mask)
    # The loss stays defined: every row keeps a positive.
    assert multi_positive_loss(torch.randn(3, 4), dropped).isfinite()


def test_mask_self_positive_draws_once_per_batch_like_coclr():
    mask = torch.ones(64, 3, dtype=torch.bool)
    outcomes = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        column = mask_self_positive(mask, 0.5, generator)[:, 0]
        assert column.all() or not column.any()  # all rows together
        outcomes.add(bool(column.all()))
    assert outcomes == {True, False}


def test_mask_self_positive_per_row_is_seeded_and_near_the_probability():
    mask = torch.ones(2000, 3, dtype=torch.bool)
    first = mask_self_positive(mask, 0.9, torch.Generator().manual_seed(3), per_row=True)
    second = mask_self_positive(mask, 0.9, torch.Generator().manual_seed(3), per_row=True)
    assert torch.equal(first, second)
    dropped_fraction = 1.0 - first[:, 0].float().mean().item()
    assert 0.87 < dropped_fraction < 0.93
    with pytest.raises(ValueError):
        mask_self_positive(mask, 1.5)


# ---- mined_precision -----------------------------------------------------------------------------


def test_mined_precision_counts_label_agreement_and_ignores_unknown_labels():
    mask = mask_of([[0, 1, 2], [0, 4]], 5)  # row 0 mined entries 0, 1; row 1 mined entry 3
    labels = torch.tensor([0, 1])
    queue_labels = torch.tensor([0, 1, 1, -1])
    # Row 0: entry 0 agrees, entry 1 does not; row 1: entry 3 has no label -> 1 / 2.
    assert mined_precision(mask, labels, queue_labels) == pytest.approx(0.5)
    assert mined_precision(mask, torch.tensor([-1, -1]), queue_labels) is None
    assert mined_precision(mask_of([[0], [0]], 5), labels, queue_labels) is None
