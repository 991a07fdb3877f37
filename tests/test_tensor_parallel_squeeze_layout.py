"""Which rows and heads each TP rank holds after the squeeze under tensor parallelism (issue 15
item 4): pure functions of the masks, balanced within one row (FFN) or one head (attention)."""
import itertools

import pytest
import torch

from vp_dist.squeeze.tensor_parallel import (attention_heads_per_rank, balanced_assignment, head_positions,
                                             inner_positions_per_rank, split_evenly)


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_balanced_assignment_deals_every_head_once_and_loads_differ_by_at_most_one_head(parts):
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        weights = torch.randint(0, 65, (16,), generator=generator).tolist()
        assignment = balanced_assignment(weights, parts)
        assert sorted(itertools.chain(*assignment)) == list(range(16))
        assert [len(items) for items in assignment] == [16 // parts] * parts
        assert all(items == sorted(items) for items in assignment)
        loads = [sum(weights[i] for i in items) for items in assignment]
        assert max(loads) - min(loads) <= max(weights) - min(weights), (weights, assignment)


def test_balanced_assignment_is_deterministic_and_breaks_ties_by_index():
    assert balanced_assignment([5, 5, 5, 5], 2) == [[0, 3], [1, 2]]
    assert balanced_assignment([8, 0, 8, 0], 2) == balanced_assignment([8, 0, 8, 0], 2) == [[0, 3], [1, 2]]
    assert balanced_assignment([1, 7, 3, 5, 2, 6], 3) == [[0, 1], [4, 5], [2, 3]]  # loads 8, 8, 8


def test_balanced_assignment_refuses_a_tp_size_that_does_not_divide_the_heads():
    with pytest.raises(ValueError, match="3 items cannot be dealt equally to 2 ranks"):
        balanced_assignment([1, 2, 3], 2)


def test_ffn_inner_rows_are_split_within_one_kept_row_and_each_position_once():
    generator = torch.Generator().manual_seed(1)
    for parts in (2, 3, 4):
        kept = torch.rand(37, generator=generator) < 0.4
        groups = inner_positions_per_rank(kept, parts)
        assert torch.equal(torch.sort(torch.cat(groups)).values, torch.arange(37))
        kept_counts = [int(kept[group].sum()) for group in groups]
        assert max(kept_counts) - min(kept_counts) <= 1 and sum(kept_counts) == int(kept.sum())
    assert [g.tolist() for g in split_evenly(torch.arange(5), 2)] == [[0, 1, 2], [3, 4]]


def test_attention_heads_are_dealt_by_kept_rows_of_query_key_and_value():
    head_size = 4
    query = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)  # 4, 0, 3, 1 per head
    key = value = torch.ones(16, dtype=torch.bool)
    heads = attention_heads_per_rank([query, key, value], num_heads=4, tp_size=2)
    assert heads == [[0, 1], [2, 3]]  # 12+8 against 11+9
    assert head_positions(heads[1], head_size).tolist() == list(range(8, 16))
