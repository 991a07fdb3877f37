"""SPEC 5 under ZeRO 1-3: the squeezed parameters replace the masked ones in a rebuilt engine; the
bytes per rank of weights, gradients and optimizer states fall with the pruned rows, Adam moments,
step count and LR schedule carry over, and training goes on computing the same function. With
`fold_ffn` the rebuild folds the FFN and shrinks each attention block whose query, key or value
lost rows exactly (`SqueezedBertAttention`)."""
import math

import pytest
import torch

from conftest import STAGES
from models import tiny_bert_config
from worker import EMPTIED

pytestmark = pytest.mark.slow
KINDS = ("params", "gradients", "optimizer_states", "total")
HEADS = tiny_bert_config().num_attention_heads
BLOCKS = ("bert.encoder.layer.0.", "bert.encoder.layer.1.")
ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def removed_elements(record) -> int:
    """Weight elements the final masks remove: pruned rows x input width, over all prunable layers."""
    shapes = list(record["layer_shapes"].values())
    masks = torch.split(record["final_kept"], [shape[0] for shape in shapes])
    return sum(int((~kept).sum()) * shape[1] for kept, shape in zip(masks, shapes))


@pytest.mark.parametrize("stage", STAGES)
def test_every_rank_shrinks_in_proportion_to_the_pruned_rows(stage, two_rank_train):
    for rank in range(two_rank_train["world_size"]):
        record = two_rank_train["ranks"][rank][stage, "squeeze"]
        fraction = removed_elements(record) / record["dense_numel"]
        assert 0.3 < fraction < 0.4  # half the encoder's weight rows, a third of this tiny model
        dense, squeezed = record["bytes_dense"], record["bytes_squeezed_after_step"]
        for kind in KINDS:
            implied = dense[kind] * fraction
            assert dense[kind] - squeezed[kind] >= 0.95 * implied, (rank, kind, dense[kind], squeezed[kind])


@pytest.mark.parametrize("stage", STAGES)
def test_prunable_layers_shrink_by_what_the_masks_imply(stage, two_rank_train):
    """Parameter + optimizer bytes of the prunable layers. ZeRO 1-2 cut one flat buffer into equal
    rank slices, so which rank holds which layer moves when the buffer shrinks: there the layers are
    summed over ranks (each rank's total is checked above); at stages 0 and 3 every rank holds its
    own share of every layer, and each rank is checked alone."""
    records = [two_rank_train["ranks"][rank][stage, "squeeze"] for rank in range(two_rank_train["world_size"])]
    shapes = records[0]["layer_shapes"]
    layer_elements = sum(math.prod(shape) + shape[0] for shape in shapes.values())  # weights + biases
    fraction = removed_elements(records[0]) / layer_elements

    def layer_bytes(record, key):
        return sum(counts["params"] + counts["optimizer_states"] for counts in record[key]["layers"].values())

    groups = [records] if stage in (1, 2) else [[record] for record in records]
    for group in groups:
        dense = sum(layer_bytes(record, "bytes_dense") for record in group)
        squeezed = sum(layer_bytes(record, "bytes_squeezed_after_step") for record in group)
        assert dense - squeezed >= 0.95 * dense * fraction, (dense, squeezed, fraction)


@pytest.mark.parametrize("stage", STAGES)
def test_squeezed_engine_keeps_training_with_finite_loss(stage, two_rank_train):
    record = two_rank_train["ranks"][0][stage, "squeeze"]
    masked = two_rank_train["ranks"][0][stage, "masked_nofold"]
    assert record["squeezed_at"] == 5
    assert all(math.isfinite(record["losses"][step]) for step in range(6, 9))
    assert record["global_steps"] == masked["global_steps"] == 8
    assert record["lr"] == masked["lr"]  # the scheduler went on from where it was


@pytest.mark.parametrize("stage", STAGES)
def test_squeezed_engine_continues_the_masked_training(stage, two_rank_train):
    """Without the FFN fold the squeezed model trains exactly like the masked one: only possible if
    every kept row's Adam moments, the bias correction step and the LR came along."""
    squeezed = two_rank_train["ranks"][0][stage, "squeeze_nofold"]
    masked = two_rank_train["ranks"][0][stage, "masked_nofold"]
    assert squeezed["squeezed_at"] == 5 and "squeezed_at" not in masked
    assert squeezed["losses"] == pytest.approx(masked["losses"], rel=1e-6)
    for name, value in masked["final_masked_view"].items():
        torch.testing.assert_close(squeezed["final_masked_view"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", STAGES)
def test_folded_squeeze_computes_the_masked_function(stage, two_rank_train):
    """With the fold, the first forward after the squeeze (step 6) gives the masked model's loss."""
    folded = two_rank_train["ranks"][0][stage, "squeeze"]["losses"]
    masked = two_rank_train["ranks"][0][stage, "masked_nofold"]["losses"]
    assert folded[6] == pytest.approx(masked[6], rel=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_rebuild_carries_exact_masters_and_moments(stage, two_rank_train):
    """Right after the final pruning, the squeezed engine's fp32 masters and Adam moments (scattered
    back to masked shapes) equal bit for bit those of the same run left masked, on every rank."""
    for rank in range(two_rank_train["world_size"]):
        squeezed = two_rank_train["ranks"][rank][stage, "squeeze_nofold"]["at_final_pruning"]
        masked = two_rank_train["ranks"][rank][stage, "masked_nofold"]["at_final_pruning"]
        assert set(masked) == {"params", "exp_avg", "exp_avg_sq"}
        for kind, values in masked.items():
            assert set(squeezed[kind]) == set(values)
            for name, value in values.items():
                assert torch.equal(squeezed[kind][name], value), (rank, kind, name)


# ---------------------------------------------------------------------- the attention shrink
def final_masks(record) -> dict[str, torch.Tensor]:
    shapes = record["layer_shapes"]
    return dict(zip(shapes, torch.split(record["final_kept"], [shape[0] for shape in shapes.values()])))


def shrinks(masks, block: str) -> bool:
    return not all(bool(masks[block + name].all()) for name in ATTENTION[:3])


def squeezed_numel(record, fold: bool, shrink: bool) -> int:
    """Parameters of the squeezed model, from the masks alone (SPEC 5): a row-squeezed layer keeps
    its kept rows and its full bias; a folded FFN keeps FFN-in's kept rows and FFN-out's columns; a
    shrunk attention block keeps Q and K rows where both were kept (`S`), the key rows whose query
    was pruned (`T`) with one collapsed query constant each, the kept value rows and a constant per
    pruned one, and attn_out's kept rows over every input column (the folded ones apart)."""
    masks, shapes = final_masks(record), record["layer_shapes"]
    numel = record["dense_numel"] - sum(d_out * d_in + d_out for d_out, d_in in shapes.values())

    def row_squeezed(name: str) -> int:
        return int(masks[name].sum()) * shapes[name][1] + shapes[name][0]

    for block in BLOCKS:
        query, key, value, out = (masks[block + name] for name in ATTENTION)
        hidden = query.numel()
        if shrink and shrinks(masks, block):
            score, collapsed = int((query & key).sum()), int((~query & key).sum())
            kept_value, kept_out = int(value.sum()), int(out.sum())
            numel += (score * hidden + score + collapsed) + (score * hidden + score + collapsed * hidden)
            numel += kept_value * hidden + hidden + kept_out * hidden + hidden
        else:
            numel += sum(row_squeezed(block + name) for name in ATTENTION)
        ffn_in, ffn_out = block + "intermediate.dense", block + "output.dense"
        if fold and not bool(masks[ffn_in].all()):
            inner = int(masks[ffn_in].sum())
            numel += inner * shapes[ffn_in][1] + inner + int(masks[ffn_out].sum()) * inner + shapes[ffn_out][0]
        else:
            numel += row_squeezed(ffn_in) + row_squeezed(ffn_out)
    return numel


@pytest.mark.parametrize("stage", STAGES)
def test_rebuilt_engine_shrinks_the_attention_blocks(stage, two_rank_train):
    """fold_ffn (the default) shrinks, in the engine as on a plain model, every attention block whose
    query, key or value lost rows; without it they are row-squeezed."""
    for rank in range(two_rank_train["world_size"]):
        for variant in ("squeeze", "shrink_nofold", "emptied"):
            record = two_rank_train["ranks"][rank][stage, variant]
            expected = [block + "attention" for block in BLOCKS if shrinks(final_masks(record), block)]
            assert expected and record["attention_blocks_after"] == expected, (rank, variant)
            # FFN-out's residual block fused where FFN-out lost rows (all of them included), with the FFN
            # fold sites (shrink_nofold drops them)
            residual = [block + "output" for block in BLOCKS if variant != "shrink_nofold"
                        and not bool(final_masks(record)[block + "output.dense"].all())]
            assert record["residual_blocks_after"] == residual, (rank, variant)
        nofold = two_rank_train["ranks"][rank][stage, "squeeze_nofold"]
        assert nofold["attention_blocks_after"] == [] and nofold["residual_blocks_after"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_squeezed_parameters_are_what_the_masks_imply(stage, two_rank_train):
    """The rebuilt engine holds exactly the parameters the masks leave: fewer with the attention
    shrink than with the row squeeze alone (query rows whose key was pruned, and key rows pruned,
    leave with their biases)."""
    records = two_rank_train["ranks"][0]
    for variant, fold, shrink in (("squeeze", True, True), ("shrink_nofold", False, True),
                                  ("squeeze_nofold", False, False), ("emptied", True, True)):
        record = records[stage, variant]
        assert record["squeezed_numel"] == squeezed_numel(record, fold, shrink), variant
        assert squeezed_numel(record, fold, True) < squeezed_numel(record, fold, False), variant
    if stage == 0:  # no ZeRO, fp32: a prunable layer holds 4 bytes per value, Adam's two moments 8 more
        record = records[stage, "squeeze"]
        other = record["dense_numel"] - sum(d_out * d_in + d_out for d_out, d_in in record["layer_shapes"].values())
        layers = record["bytes_squeezed_after_step"]["layers"]
        held = sum(counts["params"] + counts["optimizer_states"] for counts in layers.values())
        assert held == 12 * (squeezed_numel(record, True, True) - other)


def sliced(value: torch.Tensor, origin) -> torch.Tensor:
    if origin.rows is not None:
        value = value[origin.rows]
    return value[:, origin.cols] if origin.cols is not None else value


@pytest.mark.parametrize("stage", STAGES)
def test_rebuild_carries_exact_masters_and_moments_of_the_shrunk_attention(stage, two_rank_train):
    """Right after the final pruning, every new parameter of a shrunk block (query rows of `S`, the
    collapsed query constants, key rows of `S` and `T`, kept and folded value rows, attn_out's kept
    and folded columns) holds, in its fp32 master and both Adam moments, exactly the slice of the
    masked run's it came from; the block's LayerNorm, carried as it is (once), and every other
    parameter equal the masked run's bit for bit."""
    for rank in range(two_rank_train["world_size"]):
        shrunk = two_rank_train["ranks"][rank][stage, "shrink_nofold"]
        masked = two_rank_train["ranks"][rank][stage, "masked_nofold"]["at_final_pruning"]
        blocks = shrunk["attention_blocks_after"]
        origins = shrunk["origins"]
        new = [name for name in shrunk["at_final_pruning"]["params"] if name.startswith(tuple(blocks))]
        assert sum(name.endswith("attention.output.LayerNorm.weight") for name in new) == len(blocks)
        assert any(name.endswith("self.key.collapsed_weight") for name in new)
        assert any(name.endswith("output.dense.folded_weight") for name in new)
        for kind, values in shrunk["at_final_pruning"].items():
            for name, value in values.items():
                if name.startswith(tuple(blocks)) and "LayerNorm" not in name:
                    expected = sliced(masked[kind][origins[name].name], origins[name])
                else:
                    expected = masked[kind][name]
                assert torch.equal(value, expected), (rank, kind, name)


@pytest.mark.parametrize("stage", STAGES)
def test_shrunk_attention_engine_continues_the_masked_training(stage, two_rank_train):
    """With the attention shrink alone (the FFN row-squeezed) the engine trains like the masked
    one, to float rounding: the collapsed and folded features are computed from the parameters in
    every forward, so their gradients are the masked model's; the dropped rows had none."""
    shrunk = two_rank_train["ranks"][0][stage, "shrink_nofold"]
    masked = two_rank_train["ranks"][0][stage, "masked_nofold"]
    assert shrunk["squeezed_at"] == 5
    assert shrunk["losses"] == pytest.approx(masked["losses"], rel=1e-6)
    blocks, origins = tuple(shrunk["attention_blocks_after"]), shrunk["origins"]
    for name, value in shrunk["final_masked_view"].items():
        if name.startswith(blocks) and "LayerNorm" not in name:
            expected = sliced(masked["final_params"][origins[name].name], origins[name])
        else:
            expected = masked["final_masked_view"][name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", STAGES)
def test_squeeze_with_emptied_layers_computes_the_masked_function(stage, two_rank_train):
    """A whole query layer and a whole FFN-out pruned: the shrunk block (all query rows gone, every
    kept key row collapsed) and the folded FFN give the masked model's loss on the next batch."""
    squeezed = two_rank_train["ranks"][0][stage, "emptied"]
    masked = two_rank_train["ranks"][0][stage, "emptied_masked"]
    assert squeezed["squeezed_at"] == 5 and "squeezed_at" not in masked
    assert squeezed["emptied_after"] == sorted(EMPTIED)
    assert squeezed["losses"][6] == pytest.approx(masked["losses"][6], rel=1e-6)
    assert all(math.isfinite(squeezed["losses"][step]) for step in (7, 8))


@pytest.mark.parametrize("stage", STAGES)
def test_exports_of_the_rebuilt_engine_compute_its_function(stage, two_rank_train):
    """Both exports of the squeezed engine's model (stock full-size masked BERT, compact VP BERT with
    the shrunk attention blocks) give the engine's logits on a padded batch."""
    for variant in ("squeeze", "emptied"):
        exports = two_rank_train["ranks"][0][stage, variant]["exports"]
        assert exports["masked_blocks"] == 0 and exports["squeezed_blocks"] == len(BLOCKS)
        assert exports["masked_residual_blocks"] == 0
        assert exports["squeezed_residual_blocks"] == len(two_rank_train["ranks"][0][stage, variant]["residual_blocks_after"])
        for kind in ("masked", "squeezed"):
            assert exports[kind] <= 1e-5 * exports["scale"], (variant, kind, exports)


@pytest.mark.parametrize("stage", STAGES)
def test_padded_ffn_trains_as_the_unpadded_squeeze_with_its_zero_units_still_zero(stage, two_rank_train):
    """`VPConfig(pad_ffn=12)`: the rebuilt engine holds each folded FFN's inner width padded with zero
    units (optimizer state carried through `ParamOrigin`'s padding), trains along the unpadded
    squeeze's trajectory, its zero units still exactly zero after three optimizer steps, and both
    exports (which strip the units) give the engine's logits."""
    padded = two_rank_train["ranks"][0][stage, "squeeze_padded"]
    plain = two_rank_train["ranks"][0][stage, "squeeze"]
    pads = {name: (origin.pad_rows, origin.pad_cols) for name, origin in padded["origins"].items()
            if origin.pad_rows or origin.pad_cols}
    assert pads, "the run's masks must leave an FFN width that is not a multiple of 12"
    assert padded["squeezed_at"] == plain["squeezed_at"] == 5
    assert padded["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    for name, value in plain["final_params"].items():
        ours = padded["final_params"][name]
        core = tuple(slice(0, n) for n in value.shape)
        torch.testing.assert_close(ours[core], value, rtol=1e-4, atol=1e-6, msg=name)
        rest = ours.clone()
        rest[core] = 0
        assert bool((rest == 0).all()), name  # the zero units (FFN-in's last rows, FFN-out's last columns)
        assert (ours.shape != value.shape) == (name in pads), name
    exports = padded["exports"]
    for kind in ("masked", "squeezed"):
        assert exports[kind] <= 1e-5 * exports["scale"], (kind, exports)
