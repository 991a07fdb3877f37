"""A deterministic WordPiece vocabulary: the `tokenizers` BPE-style trainer with every tie broken.

`tokenizers`' ``WordPieceTrainer`` numbers its alphabet and its ``##`` pieces in hash-map order
and breaks ties between merges of equal count by those numbers, so two trainings on the same
corpus can learn different merges (about one in four on the shipped corpus). This module learns
the vocabulary the same way (alphabet, then greedy merges of the most frequent adjacent pair,
``##`` marking pieces inside a word, merging stops at ``vocab_size`` or when the best pair is
rarer than ``min_frequency``), but with a total order everywhere: the alphabet by (count
descending, character), pieces numbered in that order, words in sorted order, and merges of equal
count by the lower pair of ids. The result depends only on the word counts.

Pure Python on word counts (not on the text): ~1 s for the shipped corpus at 4,096 tokens.
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping

PREFIX = "##"


def learn_vocabulary(word_counts: Mapping[str, int], vocab_size: int, special_tokens: Iterable[str],
                     min_frequency: int = 2) -> list[str]:
    """The vocabulary learned from ``{word: count}``: special tokens, alphabet, pieces, merges in order."""
    vocab = list(dict.fromkeys(special_tokens))
    alphabet = Counter()
    for word, count in word_counts.items():
        for char in word:
            alphabet[char] += count
    vocab += [char for char, _ in sorted(alphabet.items(), key=lambda item: (-item[1], item[0]))
              if char not in vocab]
    ids = {token: index for index, token in enumerate(vocab)}

    words, counts = [], []
    for word in sorted(word_counts):
        symbols = []
        for position, char in enumerate(word):
            piece = char if position == 0 else PREFIX + char
            if piece not in ids:
                ids[piece] = len(vocab)
                vocab.append(piece)
            symbols.append(ids[piece])
        words.append(symbols)
        counts.append(word_counts[word])

    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[index]
            where.setdefault(pair, set()).add(index)
    queue = [(-count, pair) for pair, count in pair_counts.items() if count > 0]
    heapq.heapify(queue)

    while len(vocab) < vocab_size and queue:
        negative_count, pair = heapq.heappop(queue)
        current = pair_counts.get(pair, 0)
        if -negative_count != current:  # stale entry: re-queue with the pair's count now
            if current > 0:
                heapq.heappush(queue, (-current, pair))
            continue
        if current < min_frequency:
            break
        left, right = vocab[pair[0]], vocab[pair[1]]
        token = left + (right[len(PREFIX):] if right.startswith(PREFIX) else right)
        if token not in ids:
            ids[token] = len(vocab)
            vocab.append(token)
        changed = Counter()
        for index in sorted(where.pop(pair, ())):
            for changed_pair, delta in _merge(words[index], pair, ids[token]):
                changed[changed_pair] += delta * counts[index]
                if delta > 0:
                    where.setdefault(changed_pair, set()).add(index)
        pair_counts.pop(pair, None)
        changed.pop(pair, None)  # no occurrence is left (left-to-right merging consumes runs of it)
        for changed_pair, delta in sorted(changed.items()):
            pair_counts[changed_pair] += delta
            if delta > 0:
                heapq.heappush(queue, (-pair_counts[changed_pair], changed_pair))
    return vocab


def _merge(symbols: list[int], pair: tuple[int, int], new: int) -> list[tuple[tuple[int, int], int]]:
    """Replace every non-overlapping ``pair`` in ``symbols`` (left to right, in place) by ``new``;
    returns the changes of the word's neighbouring pairs (the merged pair itself excluded)."""
    left, right = pair
    changes, merged, index = [], [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and symbols[index] == left and symbols[index + 1] == right:
            if merged:
                changes += [((merged[-1], left), -1), ((merged[-1], new), 1)]
            if index + 2 < len(symbols):
                changes += [((right, symbols[index + 2]), -1), ((new, symbols[index + 2]), 1)]
            merged.append(new)
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    symbols[:] = merged
    return changes
