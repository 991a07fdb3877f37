"""Bad data is refused before training starts, naming the file or the numbers (issue 11.5)."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import tiny_model
from vp_dist.data.checks import (check_corpus_files, check_same_tokenizer, check_tokenizer_fits_model,
                                 vocabulary_sha256)
from vp_dist.data.tokenizer import train_wordpiece_tokenizer
from vp_dist.distributed.checkpoint import check_model_matches
from vp_dist.pruner import VariancePruner
from vp_dist import VPConfig

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the model reads the text and the model writes the text"] * 4


def test_an_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.txt is empty"):
        check_corpus_files(tmp_path / "empty.txt")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n  \n")
    with gzip.open(folder / "b.jsonl.gz", "wb") as handle:
        handle.write(b"")
    with pytest.raises(ValueError, match=r"is empty: its 2 file\(s\) hold no text"):
        check_corpus_files(folder)
    (folder / "c.txt").write_text("a document\n")
    check_corpus_files(folder)  # one file with text is enough


def test_a_binary_file_is_refused_naming_it(tmp_path):
    random_bytes = tmp_path / "random.txt"
    random_bytes.write_bytes(bytes((index * 7919 + 13) % 256 for index in range(100_000)))
    with pytest.raises(ValueError, match=r"random.txt looks binary"):
        check_corpus_files(random_bytes)
    with_nul = tmp_path / "folder"
    with_nul.mkdir()
    (with_nul / "good.txt").write_text("a document\n")
    (with_nul / "image.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=r"image.jsonl looks binary \(it holds NUL bytes\)"):
        check_corpus_files(with_nul)


def test_the_shipped_corpus_and_a_few_bad_bytes_pass(tmp_path):
    check_corpus_files(None)
    mostly_text = tmp_path / "latin1.txt"
    mostly_text.write_bytes("caf\u00e9 ".encode("latin-1") + b"plain English text " * 200)
    check_corpus_files(mostly_text)  # the loader replaces the odd byte and counts it


def test_an_empty_corpus_cannot_train_a_tokenizer():
    with pytest.raises(ValueError, match="holds no text to train a tokenizer"):
        train_wordpiece_tokenizer(["", "   "], 100)


def test_a_tokenizer_with_more_ids_than_the_model_embedding_is_refused():
    tokenizer = train_wordpiece_tokenizer(TEXTS, 60)
    small = tiny_model("bert-pretraining", vocab_size=len(tokenizer) - 1)
    with pytest.raises(ValueError, match=rf"ids up to {len(tokenizer) - 1} but the model's embedding has "
                                         rf"{len(tokenizer) - 1} rows"):
        check_tokenizer_fits_model(tokenizer, small)
    check_tokenizer_fits_model(tokenizer, tiny_model("bert-pretraining", vocab_size=len(tokenizer)))


def test_a_checkpoint_of_another_vocabulary_is_refused():
    model = tiny_model("bert-pretraining")
    state = {"pruner": VariancePruner(model, VPConfig()).state_dict(), "input_embedding_rows": 97}
    check_model_matches(state, tiny_model("bert-pretraining"))
    with pytest.raises(ValueError, match="input embedding has 97 rows, this model 120: the tokenizer does not match"):
        check_model_matches(state, tiny_model("bert-pretraining", vocab_size=120))
    tokenizer = train_wordpiece_tokenizer(TEXTS, 60)
    check_same_tokenizer(vocabulary_sha256(tokenizer), tokenizer, "ckpt")
    other = train_wordpiece_tokenizer(TEXTS + ["another corpus another vocabulary"] * 3, 60)
    with pytest.raises(ValueError, match="another tokenizer vocabulary"):
        check_same_tokenizer(vocabulary_sha256(tokenizer), other, "ckpt")


@pytest.mark.slow
def test_pretraining_on_a_binary_corpus_stops_before_training(tmp_path):
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(os.urandom(50_000))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               VP_FAULT_LOG=str(tmp_path / "points.log"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(ROOT / "launch/pretrain.py"), "--config",
                           str(ROOT / "launch/configs/demo.yaml"), "--output_dir", str(tmp_path / "run"),
                           "--data.corpus", str(binary)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"corpus file {binary} looks binary" in done.stderr
    assert not (tmp_path / "points.log").exists(), "no training step ran"
    assert not (tmp_path / "run" / "tokenizer").exists()
