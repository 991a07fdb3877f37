"""Fresh runs are reproducible: the trained tokenizer is the same file in every process (issue 11.1)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vp_dist.data.tokenizer import SPECIAL_TOKENS, train_wordpiece_tokenizer
from vp_dist.data.wordpiece import learn_vocabulary

ROOT = Path(__file__).resolve().parents[1]

TRAIN_ONCE = """
import hashlib, sys
from vp_dist.data.documents import default_corpus_path
from vp_dist.data.tokenizer import train_wordpiece_tokenizer
texts = default_corpus_path().read_text(encoding="utf-8").split("\\n\\n")
tokenizer = train_wordpiece_tokenizer(texts, 4096)
print(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest())
"""


@pytest.mark.slow
def test_tokenizer_training_gives_the_same_file_in_every_process():
    """The `tokenizers` trainer it replaces gave another vocabulary in about one process in four
    on this corpus (hash-ordered ties); each process here has its own hash seeds."""
    digests = set()
    for seed in range(6):
        env = dict(os.environ, PYTHONHASHSEED=str(seed), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        done = subprocess.run([sys.executable, "-c", TRAIN_ONCE], env=env, capture_output=True, text=True,
                              timeout=300, check=True)
        digests.add(done.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


def test_ties_between_equal_counts_break_by_the_lower_pair_of_ids():
    # Alphabet by (count desc, char): a b c d -> ids 0-3 after no specials; ##-pieces follow.
    # "ab" and "cd" both occur 5 times: the merge of the lower ids (a, ##b) comes first.
    vocab = learn_vocabulary({"ab": 5, "cd": 5}, vocab_size=7, special_tokens=(), min_frequency=2)
    assert vocab == ["a", "b", "c", "d", "##b", "##d", "ab"]
    vocab = learn_vocabulary({"ab": 5, "cd": 5}, vocab_size=8, special_tokens=(), min_frequency=2)
    assert vocab[-2:] == ["ab", "cd"]


def test_merges_follow_counts_and_stop_below_min_frequency():
    vocab = learn_vocabulary({"low": 5, "lower": 2, "newest": 6}, vocab_size=100, special_tokens=("[UNK]",),
                             min_frequency=5)
    learned = vocab[vocab.index("##t") + 1:]
    # (##w,##e) x8 first; then (l,##o) x7; then four pairs x6 tie: the lowest ids, (n, ##e), win.
    assert learned[:3] == ["##we", "lo", "ne"]
    assert "low" in vocab and "newest" in vocab
    assert not any(token.endswith("r") for token in learned), "pairs seen twice stay below min_frequency=5"


def test_the_vocabulary_matches_what_the_tokenizers_trainer_learns_when_no_tie_decides():
    """Same algorithm as `tokenizers`' WordPiece (BPE) trainer: on counts without ties the two agree."""
    words = {"hello": 9, "help": 7, "world": 5, "word": 4, "worm": 3}
    texts = [word for word, count in words.items() for _ in range(count)]
    reference = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    reference.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    reference.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=40, min_frequency=2,
                                                                   special_tokens=["[UNK]"], show_progress=False))
    ours = learn_vocabulary(words, vocab_size=40, special_tokens=("[UNK]",), min_frequency=2)
    assert set(ours) == set(reference.get_vocab())


def test_ids_are_special_tokens_then_sorted_tokens():
    tokenizer = train_wordpiece_tokenizer(["the model reads the text", "the model writes"] * 3, 60)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab]
    assert tokens[:5] == list(SPECIAL_TOKENS)
    assert tokens[5:] == sorted(tokens[5:])
    assert hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest() == hashlib.sha256(
        train_wordpiece_tokenizer(["the model reads the text", "the model writes"] * 3, 60)
        .backend_tokenizer.to_str().encode()).hexdigest()
