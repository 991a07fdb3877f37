"""BERT tokenizer: load a given one, reload the run's own, or train a WordPiece one offline.

:func:`load_or_train_tokenizer` decides, in this order:

1. ``path_or_name`` is a local folder or ``tokenizer.json``: load it.
2. ``path_or_name`` is a hub name: download it when online; when HF_HUB_OFFLINE is set, use only
   the local hub cache. If neither works, log why and go on to 3.
3. ``save_dir`` already holds a tokenizer (a resumed run): reload it, so ids never change. A given
   tokenizer that differs from it is refused (``ValueError``) before anything is written.
4. Train a BERT WordPiece tokenizer on the corpus (lowercasing BERT normaliser, special tokens
   [PAD] [UNK] [CLS] [SEP] [MASK] with ids 0-4), no network needed, deterministically: the same
   corpus gives the same tokenizer file in every process (``vp_dist.data.wordpiece``).

Whatever was chosen is saved to ``save_dir`` (``tokenizer.json`` + ``tokenizer_config.json``)
so the run directory is self-contained. The result is a ``transformers`` fast BERT tokenizer
(``BertTokenizerFast``; ``BertTokenizer`` with the ``tokenizers`` backend in transformers 5).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

import datasets
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from vp_dist.data.documents import hub_is_offline, offline_variables
from vp_dist.data.wordpiece import learn_vocabulary

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_MODEL_MAX_LENGTH = 512
Corpus = Union[datasets.Dataset, datasets.IterableDataset, Iterable[str]]


def load_or_train_tokenizer(
    path_or_name: str | os.PathLike[str] | None,
    corpus: Corpus,
    vocab_size: int,
    save_dir: str | os.PathLike[str],
    *,
    min_frequency: int = 2,
    max_training_documents: int | None = None,
) -> PreTrainedTokenizerBase:
    """Return the run's tokenizer (see the module docstring for the order) and save it to ``save_dir``.

    ``corpus`` is the documents dataset from :func:`~vp_dist.data.documents.load_documents` (its
    ``text`` column) or any iterable of strings; it is read only when training.
    ``max_training_documents`` caps how much of a large corpus the trainer reads.
    """
    save_dir = Path(save_dir)
    tokenizer = _load_given(str(path_or_name)) if path_or_name is not None else None
    if tokenizer is not None and (save_dir / "tokenizer.json").exists() and not _already_saved(tokenizer, save_dir):
        # Never replace it: the run's checkpoints or the prepared shards were made with its ids.
        raise ValueError(f"{save_dir} already holds another tokenizer than {path_or_name} (the one this run or "
                         f"these shards were made with); it is kept: give that one, or use a new output folder")
    if tokenizer is None and (save_dir / "tokenizer.json").exists():
        logger.info("reloading the run's tokenizer from %s", save_dir)
        return AutoTokenizer.from_pretrained(str(save_dir), local_files_only=True)
    if tokenizer is None:
        logger.info("training a WordPiece tokenizer (vocab_size=%d) on the corpus", vocab_size)
        tokenizer = train_wordpiece_tokenizer(_texts(corpus, max_training_documents), vocab_size, min_frequency)
    if not _already_saved(tokenizer, save_dir):  # ranks that load a given tokenizer do not rewrite it
        save_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
        logger.info("tokenizer with %d tokens saved to %s", len(tokenizer), save_dir)
    return tokenizer


def _already_saved(tokenizer: PreTrainedTokenizerBase, save_dir: Path) -> bool:
    saved = save_dir / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return saved.exists() and backend is not None and Tokenizer.from_file(str(saved)).to_str() == backend.to_str()


def _load_given(path_or_name: str) -> PreTrainedTokenizerBase | None:
    path = Path(path_or_name).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return _wrap(Tokenizer.from_file(str(path)))
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path_or_name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer path {path_or_name} does not exist")
    offline = hub_is_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, local_files_only=offline)
    except (OSError, ValueError) as error:  # not in the cache, no network, or no such repo
        where = f"the local hub cache ({'/'.join(offline_variables())} set)" if offline else "the hub"
        logger.warning("tokenizer %r could not be loaded from %s (%s); falling back", path_or_name, where, error)
        return None
    logger.info("loaded tokenizer %s from %s", path_or_name, "the local hub cache" if offline else "the hub")
    return tokenizer


def _texts(corpus: Corpus, max_documents: int | None) -> Iterator[str]:
    if isinstance(corpus, (datasets.Dataset, datasets.IterableDataset)):
        texts: Iterable[str] = (text for batch in corpus.iter(batch_size=1000) for text in batch["text"])
    else:
        texts = corpus
    for count, text in enumerate(texts):
        if max_documents is not None and count >= max_documents:
            return
        yield text


def _canonical_wordpiece(vocab: Iterable[str]) -> models.WordPiece:
    """The learned vocabulary in a fixed order: special tokens first, then the rest sorted.

    WordPiece encoding is greedy longest-match, independent of ids, so sorting changes no
    tokenisation and gives ids that depend on the set of tokens only.
    """
    rest = sorted(token for token in vocab if token not in SPECIAL_TOKENS)
    ordered = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *rest])}
    return models.WordPiece(vocab=ordered, unk_token="[UNK]", continuing_subword_prefix="##")


def count_words(tokenizer: Tokenizer, texts: Iterable[str]) -> Counter:
    """``{word: count}`` after the tokenizer's normaliser and pre-tokenizer (what WordPiece sees)."""
    counts: Counter = Counter()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        counts.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerBase:
    """Train an uncased BERT WordPiece tokenizer on ``texts``; special tokens get ids 0-4.

    Deterministic: the same texts give the same tokenizer, byte for byte, in every process
    (:mod:`vp_dist.data.wordpiece` learns the vocabulary with every tie broken).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be larger than the {len(SPECIAL_TOKENS)} special tokens")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    words = count_words(tokenizer, texts)
    if not words:
        raise ValueError("the corpus holds no text to train a tokenizer on: point data.corpus at a non-empty "
                         "corpus, or give a trained tokenizer in data.tokenizer")
    tokenizer.model = _canonical_wordpiece(learn_vocabulary(words, vocab_size, SPECIAL_TOKENS, min_frequency))
    if tokenizer.get_vocab_size() < vocab_size:
        logger.warning(
            "the corpus yields only %d tokens (vocab_size=%d asked): size the model's embedding by len(tokenizer)",
            tokenizer.get_vocab_size(),
            vocab_size,
        )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return _wrap(tokenizer)


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerBase:
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"tokenizer lacks the BERT special tokens {missing}")
    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=DEFAULT_MODEL_MAX_LENGTH,
    )
