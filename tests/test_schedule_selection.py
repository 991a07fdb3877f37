"""SPEC 2 (schedule, config validation) and SPEC 3 (global per-type selection)."""

import pytest
import torch

from vp_dist import VPConfig
from vp_dist.schedule import PruningSchedule
from vp_dist.selection import select_rows


def test_paper_schedule_reaches_half_at_step_2500():
    schedule = PruningSchedule.from_config(VPConfig())
    assert schedule.pruning_steps() == [(500, 0.1), (1000, 0.2), (1500, 0.3), (2000, 0.4), (2500, 0.5)]
    assert schedule.sparsity_at(499) is None and schedule.sparsity_at(3000) is None


def test_increment_that_does_not_divide_target_ends_exactly_at_target():
    schedule = PruningSchedule(start=10, interval=5, increment=0.2, target=0.5)
    assert schedule.pruning_steps() == [(10, 0.2), (15, 0.4), (20, 0.5)]


@pytest.mark.parametrize("field, value, message", [
    ("target", 1.2, "target=1.2 must be in \\(0, 1\\)"),
    ("target", 0.0, "target=0.0"),
    ("increment", 0.6, "increment=0.6 must be in \\(0, target=0.5\\]"),
    ("start", 0, "start=0 must be >= 1"),
    ("interval", 0, "interval=0"),
    ("alpha", 1.5, "alpha=1.5"),
    ("start", 2.5, "start=2.5 must be an integer"),
    ("min_rows_per_layer", -1, "min_rows_per_layer=-1"),
])
def test_inconsistent_config_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        VPConfig(**{field: value})


def layout(sizes):
    row_layer = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return row_layer


def brute_force_select(ewmv, kept, type_rows, sparsity):
    new_kept = kept.clone()
    for rows in type_rows.values():
        rows = rows.tolist()
        goal = round(sparsity * len(rows))
        wanted = goal - sum(not bool(kept[r]) for r in rows)
        candidates = sorted((float(ewmv[r]), position, r) for position, r in enumerate(rows) if kept[r])
        for _, _, r in candidates[:max(wanted, 0)]:
            new_kept[r] = False
    return new_kept


def test_selection_equals_brute_force_global_sort_per_type():
    torch.manual_seed(0)
    sizes = [8, 8, 16, 8, 8, 16]  # two "blocks" of types a, b, c
    row_layer = layout(sizes)
    offsets = [0, 8, 16, 32, 40, 48]
    type_rows = {t: torch.cat([torch.arange(offsets[i], offsets[i] + sizes[i]) for i in layers])
                 for t, layers in {"a": [0, 3], "b": [1, 4], "c": [2, 5]}.items()}
    ewmv = torch.rand(64, dtype=torch.float64)
    ewmv[[3, 9, 12, 40]] = 0.25  # ties across layers and types
    kept = torch.ones(64, dtype=torch.bool)
    for sparsity in (0.1, 0.3, 0.5):
        new_kept = select_rows(ewmv, kept, type_rows, row_layer, sparsity)
        assert torch.equal(new_kept, brute_force_select(ewmv, kept, type_rows, sparsity))
        for rows in type_rows.values():
            assert int((~new_kept[rows]).sum()) == round(sparsity * rows.numel())
        assert not bool((new_kept & ~kept).any()), "rows pruned earlier stay pruned"
        kept = new_kept
        ewmv = torch.rand(64, dtype=torch.float64)


def test_ties_break_by_layer_then_row():
    row_layer = layout([4, 4])
    type_rows = {"a": torch.arange(8)}
    new_kept = select_rows(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.bool),
                           type_rows, row_layer, 0.5)
    assert new_kept.tolist() == [False] * 4 + [True] * 4


def test_a_layer_may_lose_every_row_unless_a_floor_is_set():
    row_layer = layout([4, 4])
    type_rows = {"a": torch.arange(8)}
    ewmv = torch.tensor([0.1, 0.2, 0.3, 0.4, 5, 6, 7, 8], dtype=torch.float64)
    kept = torch.ones(8, dtype=torch.bool)
    assert select_rows(ewmv, kept, type_rows, row_layer, 0.5).tolist() == [False] * 4 + [True] * 4
    floored = select_rows(ewmv, kept, type_rows, row_layer, 0.5, min_rows_per_layer=1)
    assert floored.tolist() == [False, False, False, True, False, True, True, True]


@pytest.mark.parametrize("floor", [1, 2, 3])
def test_floor_selection_equals_brute_force_greedy(floor):
    torch.manual_seed(floor)
    row_layer = layout([5, 7, 4])
    type_rows = {"a": torch.arange(16)}
    ewmv = torch.rand(16, dtype=torch.float64)
    kept = torch.ones(16, dtype=torch.bool)
    got = select_rows(ewmv, kept, type_rows, row_layer, 0.5, min_rows_per_layer=floor)
    remaining = [5, 7, 4]
    want = kept.clone()
    pruned = 0
    for value, r in sorted((float(ewmv[r]), r) for r in range(16)):
        if pruned == round(0.5 * 16):
            break
        if remaining[int(row_layer[r])] > floor:
            remaining[int(row_layer[r])] -= 1
            want[r] = False
            pruned += 1
    assert torch.equal(got, want)
