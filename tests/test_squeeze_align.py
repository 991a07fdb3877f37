"""VPConfig(align=N): each layer's kept rows rounded up to a multiple of N after the global choice."""
import pytest
import torch

from helpers import train
from models import tiny_model
from vp_dist import VPConfig
from vp_dist.selection import select_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0):
    generator = torch.Generator().manual_seed(seed)
    sizes = [24, 24, 16]
    row_layer = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    ewmv = torch.rand(sum(sizes), generator=generator, dtype=torch.float64)
    return ewmv, row_layer, {"query": torch.arange(sum(sizes))}


def test_align_rounds_each_layer_up_by_giving_back_its_highest_variance_new_rows():
    ewmv, row_layer, type_rows = _setup()
    kept = torch.ones(64, dtype=torch.bool)
    exact = select_rows(ewmv, kept, type_rows, row_layer, 0.5)
    aligned = select_rows(ewmv, kept, type_rows, row_layer, 0.5, align=8)
    assert int((~exact).sum()) == 32
    assert not bool((exact & ~aligned).any())  # only rows the exact choice pruned come back
    for layer in range(3):
        rows = row_layer == layer
        count = int(aligned[rows].sum())
        assert count % 8 == 0 and 0 <= count - int(exact[rows].sum()) < 8
        back = aligned[rows] & ~exact[rows]
        still_pruned = ~aligned[rows]
        if bool(back.any()) and bool(still_pruned.any()):
            assert float(ewmv[rows][back].min()) >= float(ewmv[rows][still_pruned].max())


def test_align_never_restores_rows_pruned_earlier():
    ewmv, row_layer, type_rows = _setup(1)
    earlier = select_rows(ewmv, torch.ones(64, dtype=torch.bool), type_rows, row_layer, 0.25, align=8)
    ewmv = ewmv.flip(0)  # the statistics change between prunings
    later = select_rows(ewmv, earlier, type_rows, row_layer, 0.5, align=8)
    assert not bool((later & ~earlier).any())
    for layer in range(3):
        assert int(later[row_layer == layer].sum()) % 8 == 0


def test_aligned_pruner_squeezes_to_multiples_of_align():
    from vp_dist import SqueezedLinear
    model = tiny_model("bert-mlm")
    pruner, _, _ = train(model, VPConfig(start=2, interval=2, increment=0.25, target=0.5, align=8), steps=4)
    for name, kept in pruner.masks().items():
        assert int(kept.sum()) % 8 == 0, name
    small = pruner.squeeze()
    widths = [m.weight.shape[0] for m in small.modules() if isinstance(m, SqueezedLinear)]
    assert widths and all(w % 8 == 0 for w in widths)


def test_align_must_be_positive():
    with pytest.raises(ValueError, match="align=0 must be >= 1"):
        VPConfig(align=0)
