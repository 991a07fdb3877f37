#!/usr/bin/env python
"""Data-pipeline benchmark: preprocessing vs the raw tokenizer, loader speed, resume latency.

    python launch/bench_data.py --corpus_mb 200 --num_proc 2      # the README's figures
    python launch/bench_data.py --corpus_mb 5                     # a quick look
    python launch/bench_data.py --corpus_mb 5 --loader_only       # the loader again, same WORKDIR

1. Generates a corpus of ``--corpus_mb`` MB in ``--workdir`` (default /tmp/vp_bench_data): documents
   of paragraphs drawn at random from the shipped English corpus; loads it as documents (Arrow).
2. Raw tokenizer: ``tokenizers.Tokenizer.encode_batch`` over every document, batches of 1000, with
   its own thread pool on all cores of this process, nothing else.
3. Preprocessing: ``prepare_corpus`` (MLM, ``--seq_len``) with ``--num_proc`` processes on the same
   documents (Arrow cache already built, as for step 2); tokens/s and the ratio to step 2.
4. Loader: one process (no workers), this rank = the whole global batch, collated with MLM masks;
   the median of ``--loader_repeats`` passes, per wall-clock and per CPU second, and the collator
   alone on one micro-batch. ``--loader_only`` measures just this on an earlier run's WORKDIR.
5. Resume: a fresh process that opens the prepared data, resumes at step ``--resume_step`` and
   takes its first batch; time from the interpreter's start and from the data's opening.
Prints a JSON summary (also written to WORKDIR/bench_data.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import numpy as np  # noqa: E402

from vp_dist.cli import nonnegative_int, positive_float, positive_int  # noqa: E402


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    from vp_dist.data.documents import default_corpus_path

    paragraphs = [p for p in default_corpus_path().read_text().splitlines() if p.strip()]
    rng = np.random.default_rng(seed)
    target, written = int(megabytes * 1e6), 0
    with path.open("w") as f:
        while written < target:
            document = "\n".join(paragraphs[i] for i in rng.integers(len(paragraphs), size=rng.integers(5, 40)))
            f.write(document + "\n\n")
            written += len(document) + 2


def raw_tokens_per_second(documents, tokenizer) -> tuple[float, int]:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    texts = documents["text"]
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in backend.encode_batch(texts[start : start + 1000], add_special_tokens=False))
    return tokens / (time.perf_counter() - started), tokens


def loader_tokens_per_second(folder: Path, tokenizer, steps: int, global_batch: int, micro_batch: int) -> dict:
    """One pass of ``steps`` global batches: tokens per wall-clock second and per CPU second of this process
    (the CPU rate is what the loader would reach alone on a core; the wall rate depends on other jobs)."""
    from vp_dist.data import GlobalBatchSampler, MLMCollator
    from vp_dist.data.loader import prepared_loader
    from vp_dist.data.shards import PreparedDataset

    dataset = PreparedDataset(folder)
    collator = MLMCollator(tokenizer, seq_len=dataset.seq_len, seed=0)
    sampler = GlobalBatchSampler(len(dataset), global_batch, seed=0)
    batches = iter(prepared_loader(dataset, sampler, collator, rank=0, world_size=1, micro_batch_size=micro_batch,
                                   num_workers=0))
    next(batches)  # opens the memory maps
    started, cpu_started, tokens = time.perf_counter(), time.process_time(), 0
    for _ in range(steps * global_batch // micro_batch):
        tokens += int(next(batches)[2]["attention_mask"].sum())
    return {"wall": tokens / (time.perf_counter() - started), "cpu": tokens / (time.process_time() - cpu_started)}


def loader_figures(folder: Path, tokenizer, steps: int, global_batch: int, micro_batch: int, repeats: int) -> dict:
    """Medians over ``repeats`` loader passes, and the collator alone on one micro-batch (median of 200 calls)."""
    from vp_dist.data import MLMCollator
    from vp_dist.data.shards import PreparedDataset

    runs = [loader_tokens_per_second(folder, tokenizer, steps, global_batch, micro_batch) for _ in range(repeats)]
    dataset = PreparedDataset(folder)
    ids = np.random.default_rng(0).permutation(len(dataset))[:micro_batch]
    rows, keys = [dataset[int(i)] for i in ids], [(0, int(i)) for i in ids]
    collator = MLMCollator(tokenizer, seq_len=dataset.seq_len, seed=0)
    seconds = []
    for _ in range(200):
        started = time.perf_counter()
        collator(rows, keys)
        seconds.append(time.perf_counter() - started)
    return {
        "loader_tokens_per_s_one_process": round(float(np.median([run["wall"] for run in runs]))),
        "loader_tokens_per_cpu_s_one_process": round(float(np.median([run["cpu"] for run in runs]))),
        "loader_runs_tokens_per_s": [round(run["wall"]) for run in runs],
        "collator_ms_per_micro_batch": round(float(np.median(seconds)) * 1e3, 3),
    }


RESUME_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from vp_dist.data import GlobalBatchSampler, MLMCollator
from vp_dist.data.loader import prepared_loader
from vp_dist.data.shards import PreparedDataset
from transformers import AutoTokenizer
opened = time.perf_counter()
dataset = PreparedDataset({folder!r})
tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
sampler = GlobalBatchSampler(len(dataset), {global_batch}, seed=0)
steps_per_epoch = sampler.batches_per_epoch
sampler.load_state_dict({{**sampler.state_dict(), "epoch": {step} // steps_per_epoch, "position": {step} % steps_per_epoch}})
batches = prepared_loader(dataset, sampler, MLMCollator(tokenizer, seq_len=dataset.seq_len, seed=0), rank=0,
                          world_size=1, micro_batch_size={micro_batch}, num_workers=0)
epoch, step, batch = next(iter(batches))
print(time.perf_counter() - opened, epoch, step, dataset.rows_read)
"""


def resume_seconds(folder: Path, tokenizer_dir: Path, step: int, global_batch: int, micro_batch: int) -> dict:
    script = RESUME_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]), folder=str(folder),
                                  tokenizer=str(tokenizer_dir), global_batch=global_batch, step=step,
                                  micro_batch=micro_batch)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    total = time.perf_counter() - started
    return {"from_process_start_s": round(total, 3), "from_opening_data_s": round(float(out[0]), 3),
            "epoch": int(out[1]), "step_in_epoch": int(out[2]), "rows_read": int(out[3])}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus_mb", type=positive_float, default=200)
    parser.add_argument("--num_proc", type=positive_int, default=2)
    parser.add_argument("--seq_len", type=positive_int, default=128)
    parser.add_argument("--workdir", default="/tmp/vp_bench_data")
    parser.add_argument("--loader_steps", type=positive_int, default=20)
    parser.add_argument("--global_batch", type=positive_int, default=256)
    parser.add_argument("--micro_batch", type=positive_int, default=32)
    parser.add_argument("--resume_step", type=nonnegative_int, default=100_000)
    parser.add_argument("--loader_repeats", type=positive_int, default=5, help="loader passes; the median is reported")
    parser.add_argument("--loader_only", action="store_true",
                        help="only the loader figures, on WORKDIR/prepared from an earlier run (no preprocessing)")
    args = parser.parse_args()

    from vp_dist.data import load_documents, load_or_train_tokenizer
    from vp_dist.data.prepare import prepare_corpus

    work = Path(args.workdir)
    if args.loader_only:
        from transformers import AutoTokenizer

        prepared = work / "prepared"
        summary = {"cpu_cores": os.cpu_count(), "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                   **loader_figures(prepared / f"mlm-{args.seq_len}", AutoTokenizer.from_pretrained(prepared / "tokenizer"),
                                    args.loader_steps, args.global_batch, args.micro_batch, args.loader_repeats),
                   "load_average_1min_at_end": round(os.getloadavg()[0], 1)}
        print(json.dumps(summary, indent=1))
        return summary
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{args.corpus_mb:g}mb.txt"
    if not corpus.exists():
        generate_corpus(corpus, args.corpus_mb)
    output = work / "prepared"
    shutil.rmtree(output / f"mlm-{args.seq_len}", ignore_errors=True)
    started = time.perf_counter()
    documents, _ = load_documents(str(corpus), cache_dir=output / "cache")
    load_seconds = time.perf_counter() - started
    tokenizer = load_or_train_tokenizer(None, documents.select(range(min(2000, len(documents)))), 30522,
                                        output / "tokenizer")
    raw_rate, raw_tokens = raw_tokens_per_second(documents, tokenizer)

    started = time.perf_counter()
    folder = prepare_corpus(str(corpus), output, seq_len=args.seq_len, num_proc=args.num_proc,
                            documents_per_shard=max(1, len(documents) // (8 * args.num_proc)))
    prepare_seconds = time.perf_counter() - started
    manifest = json.loads((folder / "manifest.json").read_text())
    prepared_tokens = manifest["tokens"] - len(documents)  # without the [SEP] after each document
    assert prepared_tokens == raw_tokens, (prepared_tokens, raw_tokens)

    summary = {
        "cpu_cores": os.cpu_count(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),  # other jobs sharing the cores
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "documents": len(documents),
        "tokens": raw_tokens,
        "documents_to_arrow_s": round(load_seconds, 1),
        "raw_encode_batch_tokens_per_s": round(raw_rate),
        "preprocess_s": round(prepare_seconds, 1),
        "preprocess_tokens_per_s": round(prepared_tokens / prepare_seconds),
        "preprocess_over_raw": round(prepared_tokens / prepare_seconds / raw_rate, 3),
        "num_proc": args.num_proc,
        **loader_figures(folder, tokenizer, args.loader_steps, args.global_batch, args.micro_batch,
                         args.loader_repeats),
        "resume": {"step": args.resume_step, "global_batch": args.global_batch,
                   **resume_seconds(folder, output / "tokenizer", args.resume_step, args.global_batch,
                                    args.micro_batch)},
    }
    text = json.dumps(summary, indent=1)
    (work / "bench_data.json").write_text(text)
    print(text)
    return summary


if __name__ == "__main__":
    main()
