"""SPEC 6: a checkpoint resumes anywhere in the schedule with identical results: between two
prunings, after the squeeze, and on another number of ranks; a checkpoint that does not fit the
model, or is incomplete, is refused before anything is loaded."""
import os
import shutil

import pytest
import torch

from conftest import STAGES
from models import tiny_model
from worker import ds_config, new_model
from vp_dist.distributed.checkpoint import VP_FILE, load_checkpoint, read_vp_state

pytestmark = pytest.mark.slow


def uninterrupted(two_rank_train, stage):
    return two_rank_train["ranks"][0][stage, "squeeze"]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_between_two_prunings_ends_with_the_same_masks(stage, two_rank_train, two_rank_resume):
    reference = uninterrupted(two_rank_train, stage)
    for rank in range(two_rank_resume["world_size"]):
        resumed = two_rank_resume["ranks"][rank][stage, "step3"]
        assert resumed["resumed_at"] == 4 and resumed["resumed_global_steps"] == 3
        assert not resumed["resumed_squeezed"] and resumed["squeezed_at"] == 5
        assert list(resumed["events"]) == [5]
        assert torch.equal(resumed["events"][5]["kept"], reference["events"][5]["kept"])
        assert torch.equal(resumed["events"][5]["ewmv"], reference["events"][5]["ewmv"])
        assert torch.equal(resumed["final_kept"], reference["final_kept"])
        assert resumed["losses"] == {step: reference["losses"][step] for step in range(4, 9)}
        for name, value in reference["final_params"].items():
            assert torch.equal(resumed["final_params"][name], value), name


@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_the_squeeze_continues_identically(stage, two_rank_train, two_rank_resume):
    reference = uninterrupted(two_rank_train, stage)
    resumed = two_rank_resume["ranks"][0][stage, "step6"]
    assert resumed["resumed_squeezed"] and resumed["resumed_at"] == 7
    # the loader rebuilds the engine's structure, shrunk attention blocks included
    assert resumed["resumed_attention_blocks"] == reference["attention_blocks_after"] != []
    assert resumed["resumed_residual_blocks"] == reference["residual_blocks_after"] != []
    assert torch.equal(resumed["final_kept"], reference["final_kept"])
    assert resumed["losses"] == {step: reference["losses"][step] for step in (7, 8)}
    assert resumed["lr"] == reference["lr"]
    for name, value in reference["final_params"].items():
        assert torch.equal(resumed["final_params"][name], value), name


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("tag", ["step3", "step6"])
def test_two_rank_checkpoint_resumes_on_one_rank(stage, tag, two_rank_train, one_rank_resume):
    reference = uninterrupted(two_rank_train, stage)
    resumed = one_rank_resume["ranks"][0][stage, tag]
    assert resumed["resumed_squeezed"] == (tag == "step6")
    assert resumed["resumed_attention_blocks"] == (reference["attention_blocks_after"] if tag == "step6" else [])
    assert torch.equal(resumed["final_kept"], reference["final_kept"])
    for step, event in resumed["events"].items():
        torch.testing.assert_close(event["ewmv"], reference["events"][step]["ewmv"], rtol=1e-6,
                                   atol=1e-6 * float(reference["events"][step]["ewmv"].abs().max()))
    first = resumed["resumed_at"]
    assert resumed["losses"] == pytest.approx({s: reference["losses"][s] for s in range(first, 9)}, rel=1e-5)
    for name, value in reference["final_params"].items():
        torch.testing.assert_close(resumed["final_params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------- refused checkpoints
@pytest.fixture
def checkpoint_copy(tmp_path, checkpoint_dir, two_rank_train):
    """A private copy of the stage-1 checkpoints, free to damage."""
    target = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(checkpoint_dir, "stage1"), target)
    return str(target)


def test_checkpoint_of_another_model_is_refused_before_loading(checkpoint_copy):
    other = tiny_model("bert-mlm", intermediate_size=48)
    with pytest.raises(ValueError, match="another model"):
        load_checkpoint(other, ds_config(1, 2), checkpoint_copy, "step3")


def test_truncated_checkpoint_file_is_refused(checkpoint_copy):
    shard = os.path.join(checkpoint_copy, "step3", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(new_model(), ds_config(1, 2), checkpoint_copy, "step3")


def test_truncated_pruner_state_is_refused(checkpoint_copy):
    path = os.path.join(checkpoint_copy, "step6", VP_FILE)
    with open(path, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_vp_state(checkpoint_copy)  # `latest` names step6


def test_missing_pruner_state_or_checkpoint_is_refused(checkpoint_copy, tmp_path):
    os.remove(os.path.join(checkpoint_copy, "step3", VP_FILE))
    with pytest.raises(FileNotFoundError, match="not a complete vp-dist checkpoint"):
        read_vp_state(checkpoint_copy, "step3")
    with pytest.raises(FileNotFoundError, match="latest"):
        read_vp_state(str(tmp_path / "empty"))


def test_checkpoint_records_what_rebuilds_the_squeezed_model(checkpoint_copy, two_rank_train):
    state = read_vp_state(checkpoint_copy, "step6")
    assert state["squeeze"]["squeezed"] and state["squeeze"]["fold_ffn"] and state["squeeze"]["shrink_attention"]
    assert state["squeeze"]["pad_ffn"] == 1 and state["squeeze"]["head_widths"] == "split"
    assert state["dp_world_size"] == 2 and state["zero_stage"] == 1
    kept = torch.cat(list(state["squeeze"]["masks"].values()))
    assert torch.equal(kept, uninterrupted(two_rank_train, 1)["final_kept"])


@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_a_padded_squeeze_continues_identically(stage, checkpoint_dir, two_rank_train,
                                                              two_rank_resume_padded):
    """The checkpoint records `pad_ffn` (and `head_widths`), so the loader rebuilds the padded FFN
    shapes the engine trained."""
    state = read_vp_state(os.path.join(checkpoint_dir, f"stage{stage}", "padded"), "step6")
    assert state["squeeze"]["pad_ffn"] == 12 and state["squeeze"]["head_widths"] == "grouped"
    reference = two_rank_train["ranks"][0][stage, "squeeze_padded"]
    resumed = two_rank_resume_padded["ranks"][0][stage, "step6"]
    assert resumed["resumed_squeezed"] and resumed["resumed_at"] == 7
    assert resumed["losses"] == {step: reference["losses"][step] for step in (7, 8)}
    for name, value in reference["final_params"].items():
        assert torch.equal(resumed["final_params"][name], value), name
