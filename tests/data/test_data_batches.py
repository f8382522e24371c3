"""batches.py: deterministic order, exact resume, and sharding that does not depend on the world size."""
from __future__ import annotations

import pytest
import torch

from loraq.data.batches import BatchIterator, epoch_order
from loraq.data.tokenize import Example
from loraq.errors import DataError

N_ROWS = 21


def rows(n=N_ROWS):
    # row i holds token i+100 repeated (i % 4 + 2) times, so a batch tells which rows it holds
    return [(Example([100 + i] * (i % 4 + 2), [-100] + [100 + i] * (i % 4 + 1)),) for i in range(n)]


def row_ids(batch) -> list[int]:
    return [int(t) - 100 for t in batch.input_ids[:, 0]]


def iterator(**kw) -> BatchIterator:
    args = dict(global_batch_size=4, pad_id=0, packed=False, seed=7)
    args.update(kw)
    return BatchIterator(rows(), **args)


def test_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(N_ROWS, 7, 0) == epoch_order(N_ROWS, 7, 0)
    assert sorted(epoch_order(N_ROWS, 7, 0)) == list(range(N_ROWS))
    assert len({tuple(epoch_order(N_ROWS, s, e)) for s in (7, 8) for e in (0, 1)}) == 4


def test_an_epoch_covers_every_row_and_fills_the_last_batch_by_wrapping():
    it = iterator()
    assert it.batches_per_epoch == 6  # ceil(21 / 4)
    seen = [row_ids(next(it)) for _ in range(6)]
    order = epoch_order(N_ROWS, 7, 0)
    assert [r for batch in seen for r in batch] == order + order[:3]
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["index"] == 0
    assert row_ids(next(it)) == epoch_order(N_ROWS, 7, 1)[:4]


def test_resume_continues_with_the_same_batches():
    straight = iterator()
    expected = [next(straight) for _ in range(15)]
    first = iterator()
    for _ in range(8):
        next(first)
    saved = first.state_dict()
    resumed = iterator()
    resumed.load_state_dict(dict(saved))
    for want in expected[8:]:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)


def test_position_from_other_settings_is_refused():
    saved = iterator().state_dict()
    with pytest.raises(DataError, match="same --data"):
        iterator(seed=8).load_state_dict(saved)
    with pytest.raises(DataError, match="global_batch_size"):
        iterator(global_batch_size=8).load_state_dict(saved)


def test_two_ranks_together_see_what_one_process_sees():
    one = iterator(global_batch_size=4)
    ranks = [iterator(global_batch_size=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(13):  # past an epoch boundary
        whole = next(one)
        parts = [next(it) for it in ranks]
        assert row_ids(whole) == row_ids(parts[0]) + row_ids(parts[1])
        assert all(p.input_ids.shape[0] == 2 for p in parts)
        # each rank knows the trained-token count of the whole global batch, for the loss normaliser
        assert parts[0].global_trained_tokens == parts[1].global_trained_tokens == whole.num_trained_tokens
        assert parts[0].num_trained_tokens + parts[1].num_trained_tokens == whole.num_trained_tokens


def test_world_size_must_divide_the_global_batch():
    with pytest.raises(ValueError):
        iterator(global_batch_size=5, world_size=2)
