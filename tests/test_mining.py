import pytest
import torch
import torch.nn.functional as F

from tricoclr.losses import contrastive_logits, infonce_loss, multi_positive_loss
from tricoclr.mining import mask_self_positive, mine_positives, mined_precision, oracle_similarity


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
        oracle,
        queue_oracle,
        k=1,
        video_ids=video_ids,
        queue_video_ids=queue_video_ids,
        same_video_positives=True,
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
        torch.ones(2, 3),
        torch.ones(4, 3),
        k=2,
        video_ids=video_ids,
        queue_video_ids=queue_video_ids,
        same_video_positives=True,
        queue_full=False,
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


# ---- oracle similarity: cosine_sum (default) vs standardized --------------------------------------


def random_oracles(batch, queue, dims, seed=0, spreads=None):
    """Concatenated per-sampler unit vectors (batch and queue); ``spreads`` scales how much each
    sampler's queue vectors vary around a shared direction, i.e. the spread of its cosines."""
    generator = torch.Generator().manual_seed(seed)
    parts, queue_parts = [], []
    for index, dim in enumerate(dims):
        centre = torch.randn(dim, generator=generator)
        spread = 1.0 if spreads is None else spreads[index]
        parts.append(F.normalize(centre + spread * torch.randn(batch, dim, generator=generator), dim=1))
        queue_parts.append(F.normalize(centre + spread * torch.randn(queue, dim, generator=generator), dim=1))
    return torch.cat(parts, 1), torch.cat(queue_parts, 1)


def old_mine_positives(oracle, queue_oracle, k, video_ids, queue_video_ids):
    """The mining before ``similarity`` existed: top-k of the plain dot product, same-video excluded."""
    similarity = oracle.float() @ queue_oracle.float().t()
    same = (video_ids[:, None] == queue_video_ids[None, :]) & (queue_video_ids[None, :] >= 0)
    similarity = similarity.masked_fill(same, float("-inf"))
    mask = same.clone()
    mask.scatter_(1, similarity.topk(k, dim=1).indices, True)
    return torch.cat([torch.ones(len(oracle), 1, dtype=torch.bool), mask], 1)


def test_cosine_sum_is_the_default_and_bit_identical_to_the_plain_dot_product():
    oracle, queue_oracle = random_oracles(8, 40, (16, 16), seed=1)
    plain = oracle.float() @ queue_oracle.float().t()
    assert torch.equal(oracle_similarity(oracle, queue_oracle), plain)
    assert torch.equal(oracle_similarity(oracle, queue_oracle, "cosine_sum", (16, 16)), plain)
    video_ids, queue_video_ids = torch.arange(8), torch.arange(40) % 10
    expected = old_mine_positives(oracle, queue_oracle, 5, video_ids, queue_video_ids)
    for extra in ({}, {"similarity": "cosine_sum"}, {"similarity": "cosine_sum", "oracle_dims": (16, 16)}):
        mask = mine_positives(
            oracle,
            queue_oracle,
            5,
            video_ids=video_ids,
            queue_video_ids=queue_video_ids,
            same_video_positives=True,
            **extra,
        )
        assert torch.equal(mask, expected)


def test_standardized_z_scores_each_sampler_over_the_queue_then_sums():
    oracle, queue_oracle = random_oracles(3, 12, (4, 2), seed=2)
    scores = oracle_similarity(oracle, queue_oracle, "standardized", (4, 2))
    expected = 0
    for part, queue_part in ((slice(0, 4), slice(0, 4)), (slice(4, 6), slice(4, 6))):
        cosine = oracle[:, part] @ queue_oracle[:, queue_part].t()
        expected = expected + (cosine - cosine.mean(1, keepdim=True)) / cosine.std(1, correction=0, keepdim=True)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.mean(1), torch.zeros(3), atol=1e-5, rtol=0)


def test_standardized_stops_a_sampler_with_ten_times_the_spread_from_deciding_alone():
    # One anchor, two samplers ("flow" then "audio"), each part a unit vector in 2D; queue entry j's
    # part is (cos, sin) of the angle whose cosine with the anchor's (1, 0) is listed:
    #   entry:        0     1     2     3     4     5
    #   flow cos:   0.99  0.99  0.93  0.93  0.93  0.93   (standard deviation 0.028)
    #   audio cos:  0.10 -0.20  0.60  0.50 -0.30 -0.40   (0.386: 14x wider)
    flow = torch.tensor([0.99, 0.99, 0.93, 0.93, 0.93, 0.93])
    audio = torch.tensor([0.10, -0.20, 0.60, 0.50, -0.30, -0.40])

    def unit(cosines):
        return torch.stack([cosines, (1 - cosines**2).sqrt()], dim=1)

    anchor = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    queue_oracle = torch.cat([unit(flow), unit(audio)], dim=1)
    # Sum of cosines: 1.09, 0.79, 1.53, 1.43, 0.63, 0.53 -> audio decides: entries 2, 3, although
    # flow ranks 0 and 1 first.
    assert torch.equal(mine_positives(anchor, queue_oracle, k=2), mask_of([[0, 3, 4]], 7))
    # Standardized: flow z = (1.41, 1.41, -0.71 x4), audio z = (0.14, -0.64, 1.43, 1.17, -0.90, -1.16)
    # -> sums 1.56, 0.78, 0.73, 0.47, -1.61, -1.87: entries 0, 1 (each sampler weighs the same).
    standardized = mine_positives(anchor, queue_oracle, k=2, similarity="standardized", oracle_dims=(2, 2))
    assert torch.equal(standardized, mask_of([[0, 1, 2]], 7))


def test_standardized_with_one_sampler_mines_the_same_top_k_as_cosine_sum():
    # CoCLR: one sampler, so z-scoring a row is increasing and the ranking cannot change.
    for seed in range(5):
        oracle, queue_oracle = random_oracles(16, 128, (32,), seed=seed, spreads=(0.3 + seed,))
        video_ids, queue_video_ids = torch.arange(16), torch.arange(128) % 40
        common = dict(k=5, video_ids=video_ids, queue_video_ids=queue_video_ids, same_video_positives=True)
        assert torch.equal(
            mine_positives(oracle, queue_oracle, similarity="standardized", oracle_dims=(32,), **common),
            mine_positives(oracle, queue_oracle, **common),
        )


def test_standardized_gives_no_weight_to_a_sampler_without_spread_and_checks_its_inputs():
    oracle = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    queue_oracle = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.6, 0.8]])
    scores = oracle_similarity(oracle, queue_oracle, "standardized", (2, 2))
    assert scores.isfinite().all()
    assert scores.argmax().item() == 1  # decided by the second sampler; the first is constant
    with pytest.raises(ValueError, match="block"):
        oracle_similarity(oracle, queue_oracle, "standardized", None)
    with pytest.raises(ValueError, match="block"):
        oracle_similarity(oracle, queue_oracle, "standardized", (2, 3))
    with pytest.raises(ValueError, match="cosine_sum"):
        mine_positives(oracle, queue_oracle, similarity="zscore")
    with pytest.raises(ValueError, match="cosine_sum"):  # also before the queue is full
        mine_positives(oracle, queue_oracle, similarity="zscore", queue_full=False)


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


def test_mined_precision_leaves_out_same_video_entries_which_are_reported_as_their_share():
    """Same-video entries always share the anchor's class: counted with the mined ones they made
    train/mined_precision read high while the queue filled (issue 15)."""
    from tricoclr.mining import same_video_share

    mask = mask_of([[0, 1, 2, 3], [0, 4]], 5)  # row 0: entries 0, 1, 2; row 1: entry 3
    labels = torch.tensor([0, 1])
    queue_labels = torch.tensor([0, 0, 1, 0])
    video_ids = torch.tensor([7, 8])
    queue_video_ids = torch.tensor([7, 9, 10, 11])  # entry 0 is row 0's own video
    # all queue positives: entries 0, 1 agree, 2 and 3 do not -> 2 / 4
    assert mined_precision(mask, labels, queue_labels) == pytest.approx(0.5)
    # mined alone (entry 0 left out): entry 1 agrees, 2 and 3 do not -> 1 / 3
    assert mined_precision(mask, labels, queue_labels, video_ids, queue_video_ids) == pytest.approx(1 / 3)
    assert same_video_share(mask, video_ids, queue_video_ids) == pytest.approx(1 / 4)
    only_own = mask_of([[0, 1], [0]], 5)
    assert mined_precision(only_own, labels, queue_labels, video_ids, queue_video_ids) is None
    assert same_video_share(only_own, video_ids, queue_video_ids) == 1.0
    assert same_video_share(mask_of([[0], [0]], 5), video_ids, queue_video_ids) is None


def test_exclude_same_video_takes_own_video_entries_out_of_the_infonce_denominator():
    from tricoclr.losses import multi_positive_loss
    from tricoclr.mining import exclude_same_video

    logits = torch.tensor([[2.0, 1.0, 3.0, 0.5], [1.0, 0.0, 2.0, 2.0]])
    video_ids = torch.tensor([4, 5])
    queue_video_ids = torch.tensor([4, 6, -1])  # entry 0: row 0's own video; entry 2 unfilled
    out = exclude_same_video(logits, video_ids, queue_video_ids)
    assert out[0, 1] == float("-inf") and torch.equal(out[0, [0, 2, 3]], logits[0, [0, 2, 3]])
    assert torch.equal(out[1], logits[1])  # no own-video entry, unfilled slots untouched
    # the loss is InfoNCE over the key and the other videos' entries only
    expected = -(2.0 - torch.logsumexp(torch.tensor([2.0, 3.0, 0.5]), 0))
    key_only = torch.zeros(1, 4, dtype=torch.bool)
    key_only[0, 0] = True
    assert float(multi_positive_loss(out[:1], key_only)) == pytest.approx(float(expected))
