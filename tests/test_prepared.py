"""Prepared (pre-tokenised, sharded) data: same batches as the in-memory path, rank-split, O(1) resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data import assert_same_batches, run_ranks, synthetic_corpus, write_text_corpus
from vp_dist.data import GlobalBatchSampler, MLMCollator, build_mlm_dataset, build_nsp_dataset, load_documents
from vp_dist.data.prepare import prepare_corpus
from vp_dist.data.shards import PreparedDataset, check_manifest, read_manifest
from vp_dist.data.streaming import RankStream, split_documents_by_rank
from vp_dist.data.tokenizer import load_or_train_tokenizer
from vp_dist.train.config import run_config_from_dict
from vp_dist.train.data import PhaseData, check_prepared

ROOT = Path(__file__).resolve().parents[1]
NSP_SETTINGS = dict(seed=3, documents_per_batch=8)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", synthetic_corpus(150))


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLM at 32 and NSP at 64, 2 processes, shards of a few documents (rows span shard ends)."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_corpus(str(corpus), out, seq_len=32, vocab_size=300, num_proc=2, documents_per_shard=7)
    prepare_corpus(str(corpus), out, seq_len=64, objective="mlm+nsp", num_proc=2, documents_per_shard=16,
                   **NSP_SETTINGS)
    return out


@pytest.fixture(scope="module")
def in_memory(corpus: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    """The in-memory path's datasets, with the tokenizer that preprocessing trained."""
    cache = tmp_path_factory.mktemp("cache")
    documents, _ = load_documents(str(corpus), cache_dir=cache)
    tokenizer = load_or_train_tokenizer(str(prepared / "tokenizer"), documents, 300, cache / "tokenizer")
    mlm = build_mlm_dataset(documents, tokenizer, seq_len=32, cache_dir=cache)
    nsp = build_nsp_dataset(documents, tokenizer, seq_len=64, cache_dir=cache, **NSP_SETTINGS)
    return tokenizer, mlm, nsp


def run_config(prepared: Path | None, out: Path, **data) -> object:
    data = {"prepared": None if prepared is None else str(prepared), **data}
    phases = [dict(name="mlm", objective="mlm", seq_len=32, global_batch=16, micro_batch=4),
              dict(name="nsp", objective="mlm+nsp", seq_len=64, global_batch=8, micro_batch=2)]
    return run_config_from_dict(dict(output_dir=str(out), seed=3, data=data,
                                     phases=phases))


def phase_steps(cfg, phase_index: int, tokenizer, world_size: int, steps: int, state=None):
    """Every rank's PhaseData for `steps` steps, each step's micro-batches glued in rank order."""
    ranks = [PhaseData(cfg, cfg.phases[phase_index], tokenizer, rank, world_size, cfg.output_dir)
             for rank in range(world_size)]
    if state is not None:
        for data in ranks:
            data.load_state_dict(state)
    glued = []
    for _ in range(steps):
        micro_batches = [mb for data in ranks for mb in data.next_step()]
        glued.append({k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]})
    return glued, ranks


def test_prepared_rows_are_the_in_memory_rows(prepared: Path, in_memory) -> None:
    _, mlm, nsp = in_memory
    for folder, rows in ((prepared / "mlm-32", mlm), (prepared / "mlm+nsp-64", nsp)):
        dataset = PreparedDataset(folder)
        assert len(dataset) == len(rows) > 100
        for index in range(len(rows)):
            mine, theirs = dataset[index], rows[index]
            length = int(np.sum(mine["attention_mask"]))
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                assert mine[key][:length].tolist() == theirs[key][:length], (folder.name, index, key)
            assert mine.get("next_sentence_label") == theirs.get("next_sentence_label")
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


def test_read_rows_equals_the_rows_one_by_one(prepared: Path) -> None:
    dataset = PreparedDataset(prepared / "mlm-32")
    assert len(dataset.manifest["shards"]) > 5  # rows span shard ends
    indices = np.random.default_rng(0).permutation(len(dataset))[:40].tolist() + [len(dataset) - 1, 0]  # last: padded
    columns = dataset.read_rows(indices)
    assert dataset.rows_read == len(indices)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert columns[key].dtype == np.int64
        assert np.array_equal(columns[key], np.stack([dataset[i][key] for i in indices])), key
    whole = dataset.read_rows(range(len(dataset)))
    assert np.array_equal(whole["input_ids"], np.stack([dataset[i]["input_ids"] for i in range(len(dataset))]))
    with pytest.raises(IndexError, match=f"row {len(dataset)} is outside"):
        dataset.read_rows([0, len(dataset)])
    nsp = PreparedDataset(prepared / "mlm+nsp-64")
    rows = nsp.read_rows([3, 1])
    assert [row["input_ids"].tolist() for row in rows] == [nsp[i]["input_ids"].tolist() for i in (3, 1)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_preprocess_then_train_gives_the_in_memory_batches_for_the_same_seed(
    prepared: Path, in_memory, tmp_path: Path, num_workers: int
) -> None:
    tokenizer, mlm, nsp = in_memory
    cfg = run_config(prepared, tmp_path, num_workers=num_workers)
    for index, rows in ((0, mlm), (1, nsp)):
        phase = cfg.phases[index]
        collator = MLMCollator(tokenizer, seq_len=phase.seq_len, seed=cfg.seed)
        sampler = lambda: GlobalBatchSampler(len(rows), phase.global_batch, seed=cfg.seed)  # noqa: E731
        steps = sampler().batches_per_epoch + 2  # into the second epoch
        expected, _ = run_ranks(rows, sampler, 2, phase.micro_batch, steps, collator)
        got, _ = phase_steps(cfg, index, tokenizer, 2, steps)
        assert_same_batches(got, expected)


def test_one_and_two_ranks_read_the_same_global_batches(prepared: Path, in_memory, tmp_path: Path) -> None:
    tokenizer = in_memory[0]
    cfg = run_config(prepared, tmp_path, num_workers=1)
    one, _ = phase_steps(cfg, 0, tokenizer, 1, 5)
    two, _ = phase_steps(cfg, 0, tokenizer, 2, 5)
    four, _ = phase_steps(cfg, 0, tokenizer, 4, 5)
    assert_same_batches(one, two)
    assert_same_batches(one, four)


class RecordingRows(PreparedDataset):
    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.read: list[int] = []

    def __getitem__(self, index: int):
        self.read.append(index)
        return super().__getitem__(index)

    def read_rows(self, indices):  # the loader reads a micro-batch's rows at once
        self.read.extend(int(i) for i in indices)
        return super().read_rows(indices)


def test_resume_at_a_late_step_reads_only_that_steps_rows(prepared: Path, in_memory, tmp_path: Path) -> None:
    tokenizer = in_memory[0]
    cfg = run_config(prepared, tmp_path, num_workers=0)
    uninterrupted, ranks = phase_steps(cfg, 0, tokenizer, 2, 40)  # 31 steps an epoch: ends in epoch 1
    state = ranks[0].state_dict()
    assert (state["epoch"], state["position"]) == (1, 40 - ranks[0].sampler.batches_per_epoch)
    late = {**state, "epoch": 1, "position": 5}
    resumed = PhaseData(cfg, cfg.phases[0], tokenizer, 1, 2, cfg.output_dir)  # rank 1 of 2
    resumed.dataset = RecordingRows(resumed.dataset.folder)
    resumed.load_state_dict(late)
    batches = resumed.next_step()
    step_ids = resumed.sampler.epoch_order(1)[5 * 16 : 6 * 16]
    assert resumed.dataset.read == step_ids[8:].tolist()  # rank 1's half of step 36, nothing else
    expected = uninterrupted[resumed.sampler.batches_per_epoch + 5]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), expected["input_ids"][8:])
    assert resumed.state_dict()["position"] == 6


def test_interrupted_preprocessing_resumes_with_the_shards_it_has(corpus: Path, prepared: Path, tmp_path: Path) -> None:
    class Interrupt(Exception):
        pass

    def stop_after_three(marker: dict) -> None:
        done.append(marker["index"])
        if len(done) == 3:
            raise Interrupt

    done: list[int] = []
    tokenizer = str(prepared / "tokenizer")
    with pytest.raises(Interrupt):
        prepare_corpus(str(corpus), tmp_path, seq_len=32, tokenizer=tokenizer, documents_per_shard=7,
                       on_shard_done=stop_after_three)
    assert not (tmp_path / "mlm-32" / "manifest.json").exists()
    first = list(done)
    done.clear()
    prepare_corpus(str(corpus), tmp_path, seq_len=32, tokenizer=tokenizer, documents_per_shard=7,
                   on_shard_done=done.append)
    total = len(read_manifest(prepared / "mlm-32")["shards"])
    assert sorted(first + [marker["index"] for marker in done]) == list(range(total))  # none twice
    resumed, reference = read_manifest(tmp_path / "mlm-32"), read_manifest(prepared / "mlm-32")
    assert resumed["shards"] == reference["shards"] and resumed["rows"] == reference["rows"]
    for index in range(total):
        name = f"shard-{index:05d}.tokens.npy"
        assert np.array_equal(np.load(tmp_path / "mlm-32" / name), np.load(prepared / "mlm-32" / name))
    with pytest.raises(ValueError, match=r"started with other settings \(documents_per_shard=7\)"):
        prepare_corpus(str(corpus), tmp_path, seq_len=32, tokenizer=tokenizer, documents_per_shard=9)


def test_a_manifest_that_does_not_match_the_run_is_refused(prepared: Path, in_memory, tmp_path: Path) -> None:
    tokenizer = in_memory[0]
    manifest = read_manifest(prepared / "mlm-32")
    check_manifest(manifest, objective="mlm", seq_len=32, tokenizer=tokenizer, where="ok")
    with pytest.raises(ValueError, match=r"has seq_len=32 but the run needs seq_len=128"):
        check_manifest(manifest, objective="mlm", seq_len=128, tokenizer=tokenizer, where="x")
    with pytest.raises(ValueError, match=r"objective='mlm' but the run needs objective='mlm\+nsp'"):
        check_manifest(manifest, objective="mlm+nsp", seq_len=32, tokenizer=tokenizer, where="x")
    other = load_or_train_tokenizer(None, ["other words entirely for another vocabulary"] * 20, 60, tmp_path / "t")
    with pytest.raises(ValueError, match=r"tokenizer_hash="):
        check_manifest(manifest, objective="mlm", seq_len=32, tokenizer=other, where="x")
    # through the run config: a phase with no matching prepared folder stops before training
    cfg = run_config(prepared, tmp_path)
    check_prepared(cfg, tokenizer)
    cfg.phases[1].seq_len = 128
    with pytest.raises(FileNotFoundError, match=r"mlm\+nsp-128 holds no manifest.json"):
        check_prepared(cfg, tokenizer)
    with pytest.raises(ValueError, match=r"phases\[0\] \(mlm\).*tokenizer_hash="):
        check_prepared(run_config(prepared, tmp_path), other)


def test_streaming_ranks_tokenise_disjoint_documents_that_cover_the_corpus(corpus: Path, in_memory) -> None:
    stream, _ = load_documents(str(corpus), streaming=True)
    parts = [[row["text"] for row in split_documents_by_rank(stream, rank, 3)] for rank in range(3)]
    everything = [row["text"] for row in stream]
    assert sorted(sum(parts, [])) == sorted(everything) and len(sum(parts, [])) == len(everything)
    assert parts[1] == everything[1::3]
    # tokenisation runs after the split: a rank's map sees only its own documents
    seen: list[str] = []
    split = split_documents_by_rank(stream, 1, 3).map(lambda row: seen.append(row["text"]) or row)
    list(split)
    assert seen == everything[1::3]


def test_streamed_rank_batches_resume_on_the_same_step(corpus: Path, in_memory) -> None:
    tokenizer = in_memory[0]
    stream, _ = load_documents(str(corpus), streaming=True)
    rows = build_mlm_dataset(split_documents_by_rank(stream, 0, 2), tokenizer, seq_len=32)
    collator = MLMCollator(tokenizer, seq_len=32, seed=0)
    make = lambda start: RankStream(rows, collator, rank=0, world_size=2, global_batch_size=16,  # noqa: E731
                                    micro_batch_size=4, seed=1, shuffle_buffer_size=32, start_step=start)
    full = [item for item, _ in zip(make(0), range(2 * 30))]  # 2 micro-batches a step, past an epoch end
    later = [item for item, _ in zip(make(20), range(2 * 10))]
    assert [step for step, _ in full[40:]] == [step for step, _ in later] == [s for s in range(20, 30) for _ in "ab"]
    assert_same_batches([b for _, b in full[40:]], [b for _, b in later])


def test_preprocess_command_writes_the_manifest(corpus: Path, prepared: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "launch"))
    import preprocess

    folder = preprocess.main(["--corpus", str(corpus), "--output", str(tmp_path), "--seq_len", "32",
                              "--tokenizer", str(prepared / "tokenizer"), "--documents_per_shard", "50"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == read_manifest(prepared / "mlm-32")["rows"] and len(manifest["shards"]) == 3
    assert manifest["source"]["documents"] == 150 and manifest["tokenizer_hash"]


def test_preprocess_refuses_with_status_2_and_keeps_the_tokenizer(corpus: Path, prepared: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """A second call with another tokenizer is refused before anything is written: the tokenizer the
    shards were made with stays. Bad values stop before the corpus is read."""
    sys.path.insert(0, str(ROOT / "launch"))
    import preprocess

    other = tmp_path / "other_tokenizer"
    load_or_train_tokenizer(None, ["a different corpus, a different vocabulary"] * 20, 40, other)
    output = tmp_path / "out"
    common = ["--corpus", str(corpus), "--output", str(output), "--seq_len", "32", "--documents_per_shard", "50"]
    preprocess.main([*common, "--tokenizer", str(prepared / "tokenizer")])
    kept = (output / "tokenizer" / "tokenizer.json").read_bytes()
    for args, message in ((["--tokenizer", str(other)], "already holds another tokenizer"),
                          (["--vocab_size", "3"], "--vocab_size 3 must be larger than the 5 special tokens"),
                          (["--tokenizer", str(tmp_path / "nope")], "does not exist")):
        with pytest.raises(SystemExit) as stop:
            preprocess.main([*common, *args])
        assert stop.value.code == 2 and message in capsys.readouterr().err, args
    assert (output / "tokenizer" / "tokenizer.json").read_bytes() == kept


def test_streamed_phase_resumes_through_its_state_and_refuses_another_world_size(
    corpus: Path, in_memory, tmp_path: Path
) -> None:
    tokenizer = in_memory[0]
    cfg = run_config(None, tmp_path, corpus=str(corpus), streaming=True, num_workers=1)
    full, ranks = phase_steps(cfg, 0, tokenizer, 2, 6)
    cut, cut_ranks = phase_steps(cfg, 0, tokenizer, 2, 4)
    state = cut_ranks[0].state_dict()
    assert state == cut_ranks[1].state_dict() == {"steps": 4, "world_size": 2, "global_batch": 16}
    rest, _ = phase_steps(cfg, 0, tokenizer, 2, 2, state=state)
    assert_same_batches(cut + rest, full)
    with pytest.raises(ValueError, match=r"world_size=2 but this run has world_size=1.*data.prepared"):
        PhaseData(cfg, cfg.phases[0], tokenizer, 0, 1, cfg.output_dir).load_state_dict(state)
