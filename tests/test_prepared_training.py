"""launch/preprocess.py then launch/pretrain.py on 2 CPU ranks: the in-memory run's losses and masks (slow)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_pretrain_launch import launch
from vp_dist.data.prepare import prepare_corpus

pytestmark = pytest.mark.slow


def test_preprocess_then_train_matches_the_in_memory_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepared = tmp_path / "prepared"
    # the phases of test_pretrain_launch.TINY; NSP pairs drawn with the demo's seed
    prepare_corpus(None, prepared, seq_len=64, vocab_size=1024, num_proc=2, documents_per_shard=40)
    prepare_corpus(None, prepared, seq_len=96, objective="mlm+nsp", num_proc=2, documents_per_shard=40, seed=1234)
    in_memory = launch("torchrun", tmp_path / "in_memory", extra=["--data.tokenizer", str(prepared / "tokenizer")])
    from_shards = launch("torchrun", tmp_path / "shards", extra=["--data.prepared", str(prepared)])
    assert in_memory.returncode == 0 and from_shards.returncode == 0
    reports = [json.loads((tmp_path / run / "vp_report.json").read_text()) for run in ("in_memory", "shards")]
    losses = [torch.tensor([h["loss"] for h in report["history"]]) for report in reports]
    assert len(losses[0]) == 11 and torch.allclose(losses[0], losses[1], rtol=1e-5, atol=0)
    masks = [load_file(str(tmp_path / run / "masks.safetensors")) for run in ("in_memory", "shards")]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    # a run whose phase needs a length that was not prepared stops before training, naming the fix
    refused = launch("python", tmp_path / "refused", extra=["--data.prepared", str(prepared),
                                                             "--phases.mlm.seq_len", "32"])
    assert refused.returncode != 0 and "mlm-32 holds no manifest.json" in refused.stderr
    assert not (tmp_path / "refused" / "checkpoints").exists()
