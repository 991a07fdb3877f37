#!/usr/bin/env python
"""Tokenise a corpus once, offline, into memory-mapped shards that pre-training reads by index.

    python launch/preprocess.py --corpus /data/wiki --output data/wiki --seq_len 128 --num_proc 16
    python launch/preprocess.py --corpus /data/wiki --output data/wiki --seq_len 512 --objective mlm+nsp
    deepspeed --num_gpus 8 launch/pretrain.py --config launch/configs/bert_large_paper.yaml \\
        --data.prepared data/wiki

Writes OUTPUT/<objective>-<seq_len>/ (shards + manifest.json) and OUTPUT/tokenizer/ (the given
tokenizer, or one trained on the corpus; the second call reuses it). Interrupted? Run the same
command again: finished shards are kept. --corpus takes what the run config's data.corpus takes:
.txt/.jsonl/.json/.parquet files (or .gz), a folder of them, a save_to_disk folder, a hub name.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist.data.prepare import prepare_corpus  # noqa: E402
from vp_dist.data.tokenizer import SPECIAL_TOKENS  # noqa: E402


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, each option's default shown."""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--corpus", default=None, help="corpus (default: the shipped English corpus)")
    parser.add_argument("--output", required=True, help="folder for the shards, manifest and tokenizer")
    parser.add_argument("--seq_len", type=int, required=True, help="the phase's sequence length")
    parser.add_argument("--objective", choices=("mlm", "mlm+nsp"), default="mlm",
                        help="the phase's objective: MLM rows, or NSP sentence pairs with MLM")
    parser.add_argument("--tokenizer", default=None, help="path or hub name; none: train WordPiece on the corpus")
    parser.add_argument("--vocab_size", type=int, default=30522, help="when training a tokenizer")
    parser.add_argument("--num_proc", type=int, default=1, help="tokenising processes")
    parser.add_argument("--documents_per_shard", type=int, default=8192,
                        help="documents per shard (the unit of work, of resuming and of the data order)")
    parser.add_argument("--seed", type=int, default=1234, help="NSP pairs: use the run's seed")
    parser.add_argument("--hub_config", default=None, help="hub dataset config, e.g. 20231101.en")
    parser.add_argument("--split", default="train", help="split of a hub dataset or saved DatasetDict "
                        "(a text/JSON/parquet file has no splits)")
    parser.add_argument("--text_field", default="text", help="the field holding the text in JSON, parquet and "
                        "hub records")
    args = parser.parse_args(argv)
    # What would otherwise stop the run only after the corpus is read (which can take long).
    if args.tokenizer is None and args.vocab_size <= len(SPECIAL_TOKENS):
        parser.error(f"--vocab_size {args.vocab_size} must be larger than the {len(SPECIAL_TOKENS)} special tokens")
    if args.tokenizer and args.tokenizer.startswith((".", "/", "~")) and not Path(args.tokenizer).expanduser().exists():
        parser.error(f"--tokenizer {args.tokenizer} does not exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return prepare_corpus(args.corpus, args.output, seq_len=args.seq_len, objective=args.objective,
                              tokenizer=args.tokenizer, vocab_size=args.vocab_size, num_proc=args.num_proc,
                              documents_per_shard=args.documents_per_shard, seed=args.seed,
                              config_name=args.hub_config, split=args.split, text_field=args.text_field)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
