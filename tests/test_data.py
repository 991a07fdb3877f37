"""The data pipeline, spec by spec: corpus loading, tokenizer, MLM packing, masking, NSP pairs,
global batches split over ranks, resumption. Everything runs offline on small files in tmp_path."""

from __future__ import annotations

import gzip
import json
import logging
import re
import sys
import types
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from helpers import load_script
from vp_dist.data import (
    IGNORE_INDEX,
    IS_NEXT,
    IS_RANDOM,
    SPECIAL_TOKENS,
    GlobalBatchSampler,
    MLMCollator,
    StreamingGlobalBatchSampler,
    build_mlm_dataset,
    build_nsp_dataset,
    default_corpus_path,
    iter_micro_batches,
    load_documents,
    load_or_train_tokenizer,
    pack_sequences,
    tokenize_documents,
)
from vp_dist.data.nsp import split_sentences, truncate_pair

datasets.disable_progress_bars()

WORDS = (
    "the model reads a sentence and learns which word was hidden while the optimizer updates every "
    "weight of the network after each batch of examples so that training moves on step by step "
    "until the loss stops falling and the pruned layers keep only rows with high variance"
).split()


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def synthetic_corpus(num_documents: int, seed: int = 0) -> list[list[str]]:
    """Documents of paragraphs of sentences; document d's sentences all contain the word `docd`."""
    rng = np.random.default_rng(seed)
    documents = []
    for d in range(num_documents):
        paragraphs = []
        for _ in range(rng.integers(2, 5)):
            sentences = [
                f"Doc{d} " + " ".join(rng.choice(WORDS, size=rng.integers(4, 12))) + "."
                for _ in range(rng.integers(1, 5))
            ]
            paragraphs.append(" ".join(sentences))
        documents.append(paragraphs)
    return documents


def write_text_corpus(path: Path, documents: list[list[str]]) -> Path:
    path.write_text("\n\n".join("\n".join(paragraphs) for paragraphs in documents) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_documents() -> list[list[str]]:
    return synthetic_corpus(60)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, corpus_documents: list[list[str]]):
    texts = ["\n".join(paragraphs) for paragraphs in corpus_documents]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_or_train_tokenizer(None, texts, vocab_size=300, save_dir=tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory, corpus_documents: list[list[str]]) -> datasets.Dataset:
    folder = tmp_path_factory.mktemp("corpus")
    loaded, _ = load_documents(write_text_corpus(folder / "corpus.txt", corpus_documents), cache_dir=folder / "cache")
    return loaded


# --- corpus loading -------------------------------------------------------------------------


def test_text_file_repairs_and_counts_blank_lines_bad_bytes_and_long_documents(tmp_path: Path) -> None:
    long_paragraphs = [f"paragraph {i} " + "word " * 18 for i in range(10)]  # 10 x 101 chars: 2 per piece
    content = (
        b"\n\nFirst document, first paragraph.\n   \nSecond document.\r\nIts second paragraph.\n\n\n"
        + b"Bad bytes: caf\xe9 and \xff\xfe here.\n\n"
        + "\n".join(long_paragraphs).encode()
        + b"\n\n"
        + b"x" * 700
        + b"\n"
    )
    path = tmp_path / "messy.txt"
    path.write_bytes(content)

    documents, stats = load_documents(path, cache_dir=tmp_path / "cache", max_document_chars=300)

    texts = documents["text"]
    assert texts[:3] == [
        "First document, first paragraph.",
        "Second document.\nIts second paragraph.",
        "Bad bytes: caf\ufffd and \ufffd\ufffd here.",
    ]
    long_pieces = texts[3:-3]
    assert "\n".join(long_pieces) == "\n".join(p.strip() for p in long_paragraphs)
    assert all(len(piece) <= 300 for piece in long_pieces) and len(long_pieces) == 5
    assert texts[-3:] == ["x" * 300, "x" * 300, "x" * 100]  # no space: cut inside the word
    assert stats.blank_lines == 7
    assert stats.invalid_utf8_lines == 1 and stats.replaced_characters == 3
    assert stats.split_documents == 2 and stats.split_paragraphs == 1
    assert stats.documents == len(texts) == 11
    assert stats.empty_documents == 0 and stats.bad_records == 0


def test_cached_documents_come_back_with_their_stats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"one\n\ntwo \xff\n\n\nthree\n")
    first, first_stats = load_documents(path, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="vp_dist.data"):
        second, second_stats = load_documents(path, cache_dir=tmp_path / "cache")
    assert second["text"] == first["text"] == ["one", "two \ufffd", "three"]
    assert second_stats == first_stats and second_stats.invalid_utf8_lines == 1
    assert "reused from the cache" in caplog.text and "invalid_utf8_lines=1" in caplog.text


def test_jsonl_uses_the_text_field_and_counts_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"body": "Alpha paragraph.\n\nAlpha second.", "id": 1}).encode(),
        b"",
        b"{not json",
        json.dumps({"body": None}).encode(),
        json.dumps({"other": "no body"}).encode(),
        json.dumps({"body": ["not", "a", "string"]}).encode(),
        b'{"body": "caf\xe9"}',
        json.dumps([1, 2]).encode(),
        json.dumps({"body": "   "}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")

    documents, stats = load_documents(path, text_field="body", cache_dir=tmp_path / "cache")

    assert documents["text"] == ["Alpha paragraph.\nAlpha second.", "caf\ufffd"]
    assert stats.blank_lines == 1
    assert stats.bad_records == 3  # bad JSON, a list as text, a record that is not an object
    assert stats.empty_documents == 3  # null, missing, blank
    assert stats.invalid_utf8_lines == 1 and stats.replaced_characters == 1


def test_gzip_json_array_parquet_save_to_disk_and_folders_load_the_same_documents(tmp_path: Path) -> None:
    texts = ["First doc.\nSecond paragraph.", "Second doc."]
    with gzip.open(tmp_path / "array.json.gz", "wt") as f:
        json.dump([{"text": t} for t in texts], f)
    datasets.Dataset.from_dict({"text": texts, "id": [1, 2]}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "saved"))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "b.txt").write_text("Second doc.\n")
    (shards / "a.txt").write_text("First doc.\nSecond paragraph.\n")

    for source in ("array.json.gz", "c.parquet", "saved", "shards"):
        documents, stats = load_documents(tmp_path / source, cache_dir=tmp_path / "cache")
        assert documents["text"] == texts, source
        assert stats.documents == 2, source


def test_missing_text_field_error_names_the_columns(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(ValueError, match=r"text_field='text' is not a column .*\['body'\]"):
        load_documents(tmp_path / "c.parquet", cache_dir=tmp_path / "cache")


def test_streaming_gives_the_documents_of_the_cached_load(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"one\ntwo\n\nthree \xff\n")
    cached, _ = load_documents(path, cache_dir=tmp_path / "cache")
    stream, stats = load_documents(path, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["text"] for row in stream] == cached["text"] == ["one\ntwo", "three \ufffd"]
    assert [row["text"] for row in stream] == cached["text"]  # a second pass
    assert stats.documents == 2 and stats.invalid_utf8_lines == 1  # counts of the latest pass


def test_hub_name_calls_load_dataset_with_config_split_and_streaming(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["Hub document.", ""]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents, stats = load_documents(
        "wikitext", config_name="wikitext-2-raw-v1", split="validation", cache_dir=tmp_path
    )
    assert calls == [
        (("wikitext", "wikitext-2-raw-v1"), {"split": "validation", "streaming": False, "cache_dir": str(tmp_path)})
    ]
    assert documents["text"] == ["Hub document."] and stats.empty_documents == 1


def test_hub_name_offline_fails_at_once_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_be_called(*args, **kwargs):
        raise AssertionError("load_dataset must not be called offline")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    with pytest.raises(RuntimeError, match="corpus='wikitext'.*HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"):
        load_documents("wikitext", config_name="wikitext-2-raw-v1")


def test_a_missing_local_file_is_not_mistaken_for_a_hub_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_documents(tmp_path / "missing.txt")


def test_shipped_corpus_is_english_prose_with_its_licence() -> None:
    path = default_corpus_path()
    readme = (path.parent / "README.md").read_text()
    assert "PSF License" in readme and (path.parent / "LICENSE-PSF.txt").exists()
    assert 1_000_000 < path.stat().st_size < 3_000_000
    documents, stats = load_documents(path, streaming=True)
    first = next(iter(documents))["text"]
    assert first.startswith('The "assert" statement\nAssert statements are a convenient way')
    assert sum(1 for _ in documents) == stats.documents > 400
    assert stats.invalid_utf8_lines == 0 and stats.split_documents == 0


def load_make_corpus():
    return load_script(default_corpus_path().with_name("make_corpus.py"))


def corpus_python_version() -> tuple[int, ...]:
    """The CPython version the shipped corpus was built from, as its README records it."""
    readme = (default_corpus_path().parent / "README.md").read_text()
    match = re.search(r"\| Built from \| CPython (\d+)\.(\d+)\.(\d+)", readme)
    assert match, "the corpus README must record the CPython version the file was built from"
    return tuple(int(part) for part in match.groups())


def test_make_corpus_builds_documents_from_topics_and_docstrings(tmp_path: Path, monkeypatch) -> None:
    """On any Python: the builder's rules on a small stand-in for pydoc's topics and the stdlib."""
    topics = types.ModuleType("pydoc_data.topics")
    topics.topics = {
        "b_topic": "Heading\n=======\n\nUse :func:`len` and ``x`` to count things.\n\n>>> code()\n\nToo short\n",
        "a_topic": "Alpha topic text is here.\nIt continues on a second line.\n\nAnother sentence that ends well.\n",
    }
    stdlib = tmp_path / "stdlib"
    (stdlib / "test").mkdir(parents=True)
    (stdlib / "mod.py").write_text('"""Module docs are here.\n\nSecond paragraph of the module."""\n'
                                   'class C:\n    """Class C does things well."""\n'
                                   '    def f(self):\n        """Function f returns nothing at all."""\n')
    (stdlib / "one.py").write_text('"""A lone docstring paragraph."""\n')  # one paragraph: skipped
    (stdlib / "test" / "skip.py").write_text('"""Tests are skipped here.\n\nEven with two paragraphs."""\n')
    make_corpus = load_make_corpus()
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", topics)
    monkeypatch.setattr(make_corpus.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    documents, size = make_corpus.write_corpus(tmp_path / "corpus.txt")
    expected = ("Alpha topic text is here. It continues on a second line.\nAnother sentence that ends well.\n"
                "\nHeading\nUse len and x to count things.\n"
                "\nModule docs are here.\nSecond paragraph of the module.\nClass C does things well.\n"
                "Function f returns nothing at all.\n")
    assert (tmp_path / "corpus.txt").read_text(encoding="utf-8") == expected
    assert (documents, size) == (3, len(expected.encode()))


@pytest.mark.skipif(sys.version_info[:3] != corpus_python_version(),
                    reason="the shipped corpus was built from another CPython (its README says which); "
                           "test_make_corpus_builds_documents_from_topics_and_docstrings checks the builder")
def test_make_corpus_rebuilds_the_shipped_file_byte_for_byte(tmp_path: Path) -> None:
    documents, size = load_make_corpus().write_corpus(tmp_path / "rebuilt.txt")
    assert (tmp_path / "rebuilt.txt").read_bytes() == default_corpus_path().read_bytes()
    assert documents == 447 and size == default_corpus_path().stat().st_size


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_is_trained_offline_as_an_uncased_bert_wordpiece(tokenizer) -> None:
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token, tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token) == (
        "[PAD]", "[CLS]", "[SEP]", "[MASK]"
    )
    assert 200 < len(tokenizer) <= 300  # the small corpus has fewer word pieces than asked for
    assert tokenizer.tokenize("The MODEL") == tokenizer.tokenize("the model") == ["the", "model"]
    pair = tokenizer("the model", "the loss")
    tokens = tokenizer.convert_ids_to_tokens(pair["input_ids"])
    assert tokens == ["[CLS]", "the", "model", "[SEP]", "the", "loss", "[SEP]"]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_saved_tokenizer_is_reloaded_instead_of_retrained(tmp_path: Path) -> None:
    texts = ["\n".join(p) for p in synthetic_corpus(10)]
    trained = load_or_train_tokenizer(None, texts, vocab_size=200, save_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    reloaded = load_or_train_tokenizer(None, ["completely different text"], vocab_size=999, save_dir=tmp_path / "tok")
    assert reloaded.get_vocab() == trained.get_vocab()


def test_a_given_tokenizer_never_replaces_the_one_already_saved(tmp_path: Path, tokenizer) -> None:
    """A refused re-run must not orphan what the saved tokenizer's ids were used for (shards, checkpoints)."""
    texts = ["\n".join(p) for p in synthetic_corpus(10)]
    saved = load_or_train_tokenizer(None, texts, vocab_size=200, save_dir=tmp_path / "tok")
    before = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    tokenizer.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="already holds another tokenizer"):
        load_or_train_tokenizer(tmp_path / "other", [], 10, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == before
    again = load_or_train_tokenizer(tmp_path / "tok", [], 10, tmp_path / "tok")  # the same one: fine
    assert again.get_vocab() == saved.get_vocab()


def test_hub_tokenizer_name_offline_falls_back_to_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vp_dist.data"):
        tokenizer = load_or_train_tokenizer("no-such-org/no-such-tokenizer", ["the model reads"] * 5, 50, tmp_path)
    assert "could not be loaded from the local hub cache (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set)" in caplog.text
    assert "training a WordPiece tokenizer" in caplog.text
    assert tokenizer.tokenize("the model") == ["the", "model"]


def test_a_local_tokenizer_folder_or_file_is_used_as_given(tmp_path: Path, tokenizer) -> None:
    tokenizer.save_pretrained(str(tmp_path / "given"))
    from_folder = load_or_train_tokenizer(tmp_path / "given", [], 10, tmp_path / "run1")
    from_file = load_or_train_tokenizer(tmp_path / "given" / "tokenizer.json", [], 10, tmp_path / "run2")
    assert from_folder.get_vocab() == from_file.get_vocab() == tokenizer.get_vocab()
    assert (tmp_path / "run2" / "tokenizer.json").exists()


# --- phase 1: packing and masking -----------------------------------------------------------


def test_packing_keeps_every_token_in_cls_sep_blocks_of_seq_len(documents, tokenizer, tmp_path: Path) -> None:
    seq_len = 32
    tokenized = tokenize_documents(documents, tokenizer, cache_dir=tmp_path)
    packed = pack_sequences(
        tokenized, seq_len=seq_len, cls_token_id=2, sep_token_id=3, pad_token_id=0, cache_dir=tmp_path
    )
    stream = [t for ids in tokenized["input_ids"] for t in ids]
    expected_blocks = -(-len(stream) // (seq_len - 2))
    assert len(packed) == expected_blocks
    recovered = []
    for i, row in enumerate(packed):
        ids, mask = row["input_ids"], row["attention_mask"]
        assert len(ids) == len(mask) == len(row["token_type_ids"]) == seq_len
        assert set(row["token_type_ids"]) == {0}
        real = sum(mask)
        assert mask == [1] * real + [0] * (seq_len - real)
        assert real == seq_len or i == len(packed) - 1  # only the last block is padded
        assert ids[0] == 2 and ids[real - 1] == 3 and ids[real:] == [0] * (seq_len - real)
        recovered.extend(ids[1 : real - 1])
    assert recovered == stream
    # each document ends with [SEP]: the stream holds one [SEP] per document
    assert stream.count(3) == len(documents)
    first_document = tokenizer(documents[0]["text"], add_special_tokens=False)["input_ids"]
    assert stream[: stream.index(3)] == first_document


def test_streaming_mlm_dataset_equals_the_cached_one(tmp_path: Path, tokenizer, corpus_documents) -> None:
    path = write_text_corpus(tmp_path / "c.txt", corpus_documents)
    cached_docs, _ = load_documents(path, cache_dir=tmp_path / "cache")
    stream_docs, _ = load_documents(path, streaming=True)
    cached = build_mlm_dataset(cached_docs, tokenizer, seq_len=64, cache_dir=tmp_path / "cache")
    streamed = build_mlm_dataset(stream_docs, tokenizer, seq_len=64)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["input_ids"] for row in streamed] == cached["input_ids"]


def test_collator_masks_15_percent_of_real_tokens_never_special_or_padding(
    documents, tokenizer, tmp_path: Path
) -> None:
    packed = build_mlm_dataset(documents, tokenizer, seq_len=64, cache_dir=tmp_path)
    collator = MLMCollator(tokenizer, seq_len=64, seed=0)
    rows = [packed[i] for i in range(len(packed))]
    batch = collator(rows)
    original = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)

    chosen = batch["labels"] != IGNORE_INDEX
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    real = torch.tensor([row["attention_mask"] for row in rows]).bool()
    assert not (chosen & special).any() and not (chosen & ~real).any()
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    assert chosen.sum() / (real & ~special).sum() == pytest.approx(0.15, abs=0.01)
    replaced_by_mask = (batch["input_ids"][chosen] == tokenizer.mask_token_id).float().mean()
    kept = (batch["input_ids"][chosen] == original[chosen]).float().mean()
    assert replaced_by_mask == pytest.approx(0.8, abs=0.04)
    assert kept == pytest.approx(0.1, abs=0.03)  # plus random tokens that happen to equal the original
    assert not torch.isin(batch["input_ids"][chosen], torch.tensor([0, 1, 2, 3])).any()
    assert batch["token_type_ids"].abs().sum() == 0 and batch["input_ids"].dtype == torch.long


def test_collator_masks_depend_only_on_seed_and_key(documents, tokenizer, tmp_path: Path) -> None:
    rows = [build_mlm_dataset(documents, tokenizer, seq_len=64, cache_dir=tmp_path)[i] for i in range(4)]
    keys = [(0, 10), (0, 11), (0, 12), (0, 13)]
    a = MLMCollator(tokenizer, seq_len=64, seed=1)(rows, keys)
    b = MLMCollator(tokenizer, seq_len=64, seed=1)(rows[2:], keys[2:])
    c = MLMCollator(tokenizer, seq_len=64, seed=2)(rows, keys)
    assert torch.equal(a["labels"][2:], b["labels"]) and torch.equal(a["input_ids"][2:], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])


# --- phase 2: NSP ---------------------------------------------------------------------------


def contains(sequence: list[int], part: list[int]) -> bool:
    return f",{','.join(map(str, part))}," in f",{','.join(map(str, sequence))},"


def test_nsp_pairs_are_balanced_fit_seq_len_and_b_really_follows_or_not(documents, tokenizer, tmp_path: Path) -> None:
    seq_len = 48
    pairs = build_nsp_dataset(documents, tokenizer, seq_len=seq_len, seed=0, documents_per_batch=20, cache_dir=tmp_path)
    document_tokens = [
        [t for sentence in split_sentences(text) for t in tokenizer(sentence, add_special_tokens=False)["input_ids"]]
        for text in documents["text"]
    ]
    labels = np.array(pairs["next_sentence_label"])
    assert len(pairs) > 150 and abs(labels.mean() - 0.5) < 0.08
    for row in pairs:
        ids, types = row["input_ids"], row["token_type_ids"]
        assert len(ids) <= seq_len and row["attention_mask"] == [1] * len(ids)
        first_sep = ids.index(3)
        assert ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        tokens_a, tokens_b = ids[1:first_sep], ids[first_sep + 1 : -1]
        assert tokens_a and tokens_b
        home = [d for d, tokens in enumerate(document_tokens) if contains(tokens, tokens_a)]
        if row["next_sentence_label"] == IS_NEXT:
            assert any(contains(document_tokens[d], tokens_a + tokens_b) for d in home)
        else:
            assert row["next_sentence_label"] == IS_RANDOM
            assert any(contains(tokens, tokens_b) for d, tokens in enumerate(document_tokens) if d not in home)


def test_nsp_rows_are_deterministic_given_the_seed(documents, tokenizer, tmp_path: Path) -> None:
    def build(seed: int, cache: str) -> datasets.Dataset:
        return build_nsp_dataset(documents, tokenizer, seq_len=48, seed=seed, cache_dir=tmp_path / cache)

    assert build(0, "a")[:] == build(0, "b")[:]
    assert build(0, "a")["next_sentence_label"] != build(1, "c")["next_sentence_label"]


def test_nsp_batch_collates_with_mlm_labels_and_next_sentence_label(documents, tokenizer, tmp_path: Path) -> None:
    pairs = build_nsp_dataset(documents, tokenizer, seq_len=48, seed=0, cache_dir=tmp_path)
    batch = MLMCollator(tokenizer, seq_len=48)([pairs[i] for i in range(8)])
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 48)
    assert torch.equal(batch["next_sentence_label"], torch.tensor(pairs["next_sentence_label"][:8], dtype=torch.long))
    lengths = torch.tensor([len(pairs[i]["input_ids"]) for i in range(8)])
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == 0).all() and (batch["labels"][padding] == IGNORE_INDEX).all()


def test_truncate_pair_trims_a_from_the_front_and_b_from_the_back() -> None:
    assert truncate_pair([1, 2, 3, 4, 5, 6], [7, 8], 5) == ([4, 5, 6], [7, 8])
    assert truncate_pair([1, 2], [3, 4, 5, 6, 7, 8], 5) == ([1, 2], [3, 4, 5])
    assert truncate_pair([1, 2, 3], [4, 5, 6], 4) == ([2, 3], [4, 5])


# --- global batches over ranks, resumption ---------------------------------------------------


def run_ranks(dataset, make_sampler, world_size: int, micro_batch_size: int, steps: int, collator, state=None):
    """Simulate `world_size` ranks (one sampler each) for `steps` steps; glue each step's micro-batches."""
    samplers = [make_sampler() for _ in range(world_size)]
    if state is not None:
        for sampler in samplers:
            sampler.load_state_dict(state)
    iterators = [
        iter_micro_batches(
            dataset, sampler, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, collator=collator
        )
        for rank, sampler in enumerate(samplers)
    ]
    glued = []
    for _ in range(steps):
        micro_batches = [mb for it in iterators for mb in next(it)]
        glued.append({k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]})
    states = [s.state_dict() for s in samplers]
    assert all(state == states[0] for state in states)
    return glued, states[0]


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def packed(documents, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> datasets.Dataset:
    return build_mlm_dataset(documents, tokenizer, seq_len=32, cache_dir=tmp_path_factory.mktemp("packed"))


def test_one_rank_and_two_ranks_see_the_same_global_batch_masks_included(packed, tokenizer) -> None:
    collator = MLMCollator(tokenizer, seq_len=32, seed=3)
    make = partial(GlobalBatchSampler, len(packed), global_batch_size=16, seed=7)
    one_rank, _ = run_ranks(packed, make, world_size=1, micro_batch_size=16, steps=4, collator=collator)
    two_ranks, _ = run_ranks(packed, make, world_size=2, micro_batch_size=4, steps=4, collator=collator)
    four_ranks, _ = run_ranks(packed, make, world_size=4, micro_batch_size=2, steps=4, collator=collator)
    assert_same_batches(one_rank, two_ranks)
    assert_same_batches(one_rank, four_ranks)


def test_each_epoch_visits_every_example_at_most_once_in_a_new_order(packed) -> None:
    sampler = GlobalBatchSampler(len(packed), global_batch_size=16, seed=0)
    batches = iter(sampler.iter_global_batches(packed))
    epochs: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(2 * sampler.batches_per_epoch):
        batch = next(batches)
        epochs[batch.epoch].extend(batch.example_ids.tolist())
    for ids in epochs.values():
        assert len(ids) == len(set(ids)) == sampler.batches_per_epoch * 16
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize(("world_before", "world_after"), [(2, 2), (2, 1), (1, 4)])
def test_resumed_iteration_continues_exactly_where_it_stopped(packed, tokenizer, world_before, world_after) -> None:
    collator = MLMCollator(tokenizer, seq_len=32, seed=0)
    make = partial(GlobalBatchSampler, len(packed), global_batch_size=16, seed=5)
    steps = make().batches_per_epoch + 3  # crosses an epoch boundary
    uninterrupted, _ = run_ranks(packed, make, world_before, 4, steps, collator)
    for stop in (1, make().batches_per_epoch, steps - 2):
        before, state = run_ranks(packed, make, world_before, 4, stop, collator)
        after, _ = run_ranks(packed, make, world_after, 4, steps - stop, collator, state=state)
        assert_same_batches(before + after, uninterrupted)


def test_streaming_sampler_resumes_without_repeating_or_skipping(tmp_path: Path, tokenizer, corpus_documents) -> None:
    stream_docs, _ = load_documents(write_text_corpus(tmp_path / "c.txt", corpus_documents), streaming=True)
    stream = build_mlm_dataset(stream_docs, tokenizer, seq_len=32)  # 146 blocks: 9 global batches an epoch
    collator = MLMCollator(tokenizer, seq_len=32, seed=0)
    make = partial(StreamingGlobalBatchSampler, global_batch_size=16, seed=1, shuffle_buffer_size=64)
    uninterrupted, state = run_ranks(stream, make, 2, 4, 12, collator)
    assert state["epoch"] == 1 and state["position"] == 3
    assert not torch.equal(uninterrupted[0]["input_ids"], uninterrupted[9]["input_ids"])  # reshuffled
    for stop in (5, 9, 10):
        before, state = run_ranks(stream, make, 2, 4, stop, collator)
        after, _ = run_ranks(stream, make, 1, 8, 12 - stop, collator, state=state)
        assert_same_batches(before + after, uninterrupted)


def test_global_batch_must_split_evenly_over_ranks_and_micro_batches(packed, tokenizer) -> None:
    sampler = GlobalBatchSampler(len(packed), global_batch_size=16, seed=0)
    collator = MLMCollator(tokenizer, seq_len=32)
    with pytest.raises(ValueError, match=r"global_batch_size=16 must be a multiple of .* 3 \* 2 = 6"):
        iter_micro_batches(packed, sampler, rank=0, world_size=3, micro_batch_size=2, collator=collator)


def test_state_from_another_global_batch_size_is_refused(packed) -> None:
    state = GlobalBatchSampler(len(packed), global_batch_size=16, seed=0).state_dict()
    with pytest.raises(ValueError, match="global_batch_size=16 but this sampler has global_batch_size=8"):
        GlobalBatchSampler(len(packed), global_batch_size=8, seed=0).load_state_dict(state)


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.txt", "\n\n  \n"),
                                           ("other_field.jsonl", '{"body": "hello world"}\n')])
def test_a_corpus_without_text_is_refused_naming_the_text_field(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=r"no document with text: corpus .*documents=0.*text_field='text'"):
        load_documents(path, cache_dir=tmp_path / "cache")
