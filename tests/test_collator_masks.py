"""MLM masks of :class:`~vp_dist.data.collator.MLMCollator`: counter-based, keyed per row, vectorised.

Exact per-row counts, never special tokens or padding, 80/10/10 within tolerance, uniform positions
and random tokens, determinism by ``(seed, key)``, and masks that do not depend on how rows are grouped
into micro-batches, on ``seq_len`` padding, or on rows vs columns input. The hashes are pure integer
arithmetic, so the statistics below are fixed numbers, not flaky draws.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vp_dist.data import IGNORE_INDEX, MLMCollator
from vp_dist.data.collator import mix64, row_states
from vp_dist.data.tokenizer import load_or_train_tokenizer

WORDS = "the model reads a sentence and learns which word was hidden while the optimizer updates every weight".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, size=40)) for i in range(50)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_or_train_tokenizer(None, texts, vocab_size=120, save_dir=tmp_path_factory.mktemp("tokenizer"))


def make_rows(tokenizer, count: int, seq_len: int, seed: int = 0, *, full: bool = False) -> list[dict]:
    """[CLS] tokens [SEP] (sometimes a [SEP] and a [MASK] inside, as after NSP/preprocessing), padded."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    words = np.array([i for i in range(len(tokenizer)) if i not in special])
    rows = []
    for _ in range(count):
        length = seq_len if full else int(rng.integers(2, seq_len + 1))
        ids = rng.choice(words, size=length)
        ids[0], ids[-1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        if length > 10 and not full and rng.random() < 0.5:
            ids[rng.integers(1, length - 1)] = tokenizer.sep_token_id
            ids[rng.integers(1, length - 1)] = tokenizer.mask_token_id
        rows.append({"input_ids": ids.tolist(), "token_type_ids": [0] * length, "attention_mask": [1] * length})
    return rows


def originals(rows: list[dict], seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    real = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        real[i, : len(row["input_ids"])] = True
    return ids, real


def test_mix64_is_splitmix64() -> None:
    # splitmix64 seeded with 0: its first outputs are mix64(k * golden), k = 1, 2 (reference values)
    golden = np.uint64(0x9E3779B97F4A7C15)
    outputs = mix64(np.array([1, 2], dtype=np.uint64) * golden)
    assert outputs.tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert row_states(0, np.array([[0, 7]])).tolist() != row_states(0, np.array([[7, 0]])).tolist()
    assert row_states(0, np.array([[1]])).tolist() != row_states(0, np.array([[1, 0]])).tolist()  # length counts


def test_exactly_round_p_n_at_least_one_of_the_maskable_tokens_per_row(tokenizer) -> None:
    rows = make_rows(tokenizer, 600, 64, seed=1)
    rows.append({"input_ids": [tokenizer.cls_token_id, tokenizer.sep_token_id], "token_type_ids": [0, 0],
                 "attention_mask": [1, 1]})  # nothing maskable: nothing chosen
    batch = MLMCollator(tokenizer, seq_len=64, seed=0)(rows, [(0, i) for i in range(len(rows))])
    ids, real = originals(rows, 64, tokenizer.pad_token_id)
    maskable = real & ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    n = maskable.sum(1).tolist()
    expected = [min(k, max(1, round(0.15 * k))) for k in n]
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == expected
    assert {1, 2} <= set(n) and any(0.15 * k % 1 == 0.5 for k in n)  # the edge cases occur (10 -> 2, 30 -> 4)
    assert expected[-1] == 0 and (batch["labels"][-1] == IGNORE_INDEX).all()


def test_special_tokens_and_padding_are_never_chosen_and_unchosen_tokens_are_kept(tokenizer) -> None:
    rows = make_rows(tokenizer, 800, 48, seed=2)
    batch = MLMCollator(tokenizer, seq_len=48, seed=5)(rows, [(3, i) for i in range(len(rows))])
    ids, real = originals(rows, 48, tokenizer.pad_token_id)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    chosen = batch["labels"] != IGNORE_INDEX
    assert special.any() and (~real).any()
    assert not (chosen & special).any() and not (chosen & ~real).any()
    assert torch.equal(batch["labels"][chosen], ids[chosen])
    assert torch.equal(batch["input_ids"][~chosen], ids[~chosen])
    replaced = batch["input_ids"][chosen]
    assert not torch.isin(replaced[replaced != tokenizer.mask_token_id], torch.tensor(tokenizer.all_special_ids)).any()
    assert torch.equal(batch["attention_mask"], real.long())


def test_chosen_fraction_80_10_10_and_uniform_positions_and_tokens(tokenizer) -> None:
    seq_len, count = 128, 4000
    rows = make_rows(tokenizer, count, seq_len, seed=3, full=True)  # 126 maskable tokens a row: 19 chosen
    batch = MLMCollator(tokenizer, seq_len=seq_len, seed=0)(rows, [(0, i) for i in range(count)])
    ids, _ = originals(rows, seq_len, tokenizer.pad_token_id)
    chosen = batch["labels"] != IGNORE_INDEX
    assert (chosen.sum(1) == round(0.15 * 126)).all()
    got, was = batch["input_ids"][chosen], ids[chosen]
    vocab_words = len(tokenizer) - len(set(tokenizer.all_special_ids))
    to_mask = (got == tokenizer.mask_token_id).float().mean().item()
    kept = (got == was).float().mean().item()  # 10% kept + random tokens equal to the original (1 / vocab_words)
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / vocab_words, abs=0.01)
    assert 1 - to_mask - kept == pytest.approx(0.1 * (1 - 1 / vocab_words), abs=0.01)

    # positions 1..126: each chosen with probability 19/126; chi-square over 125 degrees of freedom
    per_position = chosen[:, 1:-1].sum(0).double()
    expected = count * 19 / 126
    chi2 = ((per_position - expected) ** 2 / expected).sum().item()
    assert chi2 < 200, chi2  # p ~ 1e-5 at 200; a biased choice gives thousands
    assert not chosen[:, [0, -1]].any()
    # pairs: neighbours chosen together as often as sampling without replacement says
    together = (chosen[:, 1:-2] & chosen[:, 2:-1]).double().mean().item()
    assert together == pytest.approx(19 * 18 / (126 * 125), rel=0.05)

    # random replacements: uniform over the non-special ids
    random_ids = got[(got != tokenizer.mask_token_id) & (got != was)]
    histogram = torch.bincount(random_ids, minlength=len(tokenizer)).double()
    words = histogram[~torch.isin(torch.arange(len(tokenizer)), torch.tensor(tokenizer.all_special_ids))]
    assert (words > 0).all()
    expected_words = len(random_ids) / vocab_words * (1 + 1 / (vocab_words - 1))  # equal-to-original draws are missing
    chi2_words = ((words - expected_words) ** 2 / expected_words).sum().item()
    assert chi2_words < 2.0 * vocab_words, chi2_words


def test_masks_depend_only_on_seed_and_key(tokenizer) -> None:
    rows = make_rows(tokenizer, 64, 64, seed=4)
    keys = [(1, 1000 + i) for i in range(64)]
    a = MLMCollator(tokenizer, seq_len=64, seed=1)(rows, keys)
    b = MLMCollator(tokenizer, seq_len=64, seed=1)(rows, np.array(keys))  # another collator, array keys
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = MLMCollator(tokenizer, seq_len=64, seed=1)
    again(rows, [(9, i) for i in range(64)])  # earlier calls change nothing
    c = again(rows, keys)
    assert all(torch.equal(a[k], c[k]) for k in a)

    chosen = a["labels"] != IGNORE_INDEX
    for other in (MLMCollator(tokenizer, seq_len=64, seed=2)(rows, keys),  # another seed
                  MLMCollator(tokenizer, seq_len=64, seed=1)(rows, [(2, 1000 + i) for i in range(64)]),  # epoch
                  MLMCollator(tokenizer, seq_len=64, seed=1)(rows, [(1000 + i, 1) for i in range(64)])):  # order
        differs = ((other["labels"] != IGNORE_INDEX) != chosen).any(1)
        assert differs.float().mean() > 0.9  # rows with one or two maskable tokens may agree by chance
    # the same row under two keys of a batch: different masks
    twice = MLMCollator(tokenizer, seq_len=64, seed=1)([rows[0]] * 8, [(0, i) for i in range(8)])
    assert len({tuple(row.tolist()) for row in twice["labels"]}) == 8


def test_masks_do_not_depend_on_micro_batches_padding_or_rows_vs_columns(tokenizer) -> None:
    rows = make_rows(tokenizer, 48, 40, seed=5)
    keys = [(2, 7 * i + 3) for i in range(48)]
    collator = MLMCollator(tokenizer, seq_len=40, seed=9)
    whole = collator(rows, keys)
    for size in (1, 5, 16):
        parts = [collator(rows[s : s + size], keys[s : s + size]) for s in range(0, 48, size)]
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), (size, key)
    shuffled = np.random.default_rng(0).permutation(48)
    mixed = collator([rows[i] for i in shuffled], [keys[i] for i in shuffled])
    assert all(torch.equal(mixed[k], whole[k][shuffled]) for k in whole)

    wider = MLMCollator(tokenizer, seq_len=100, seed=9)(rows, keys)  # more padding: the same masks
    assert all(torch.equal(wider[k][:, :40], whole[k]) for k in whole)
    assert (wider["labels"][:, 40:] == IGNORE_INDEX).all()

    ids, real = originals(rows, 40, tokenizer.pad_token_id)
    columns = {"input_ids": ids.numpy(), "token_type_ids": np.zeros((48, 40), dtype=np.int64),
               "attention_mask": real.long().numpy()}
    from_columns = collator(columns, keys)
    assert all(torch.equal(from_columns[k], whole[k]) for k in whole)
    assert np.array_equal(columns["input_ids"], ids.numpy())  # the caller's arrays are not masked in place


class StubTokenizer:
    """What the collator reads of a tokenizer: 1000 ids, 0-4 special ([PAD] 0, [MASK] 4)."""

    pad_token_id, mask_token_id, all_special_ids = 0, 4, [0, 1, 2, 3, 4]

    def __len__(self) -> int:
        return 1000


def test_masks_of_a_pinned_row_stay_the_same() -> None:
    """Pins this scheme's masks (values recorded from this implementation, not from an outside
    reference): a change of the hashing changes every run's batches, so it must be deliberate."""
    row = {"input_ids": list(range(100, 164)), "token_type_ids": [0] * 64, "attention_mask": [1] * 64}
    batch = MLMCollator(StubTokenizer(), seq_len=64, seed=0)([row], [(0, 0)])
    chosen = torch.nonzero(batch["labels"][0] != IGNORE_INDEX).flatten().tolist()
    assert (chosen, batch["input_ids"][0, chosen].tolist()) == PINNED


PINNED = ([4, 19, 31, 37, 39, 40, 41, 57, 58, 61], [4, 4, 4, 4, 572, 4, 267, 4, 4, 4])


def test_bad_keys_are_refused(tokenizer) -> None:
    rows = make_rows(tokenizer, 3, 16, seed=6)
    collator = MLMCollator(tokenizer, seq_len=16)
    with pytest.raises(ValueError, match="got 2 keys for 3 examples"):
        collator(rows, [(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="the same number per row"):
        collator(rows, [(0, 1), (0, 2), (0,)])
