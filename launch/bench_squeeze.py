#!/usr/bin/env python
"""A dense BERT (stock Hugging Face MLM head) against the same BERT squeezed at `--sparsity`.

Both models live in one process and are timed interleaved (dense, squeezed, dense, ...), so drift
in machine load hits both alike. Measured, per model:
- training step (forward, backward, AdamW step) at `--batch` x `--seq`: median seconds. The MLM
  head scores every position (`--head-positions all`, Hugging Face's `BertForMaskedLM` loss), or,
  as vp-dist's pre-training loop does (`model.masked_positions_only`, the default there), only the
  labelled 15% (`--head-positions labelled`: the stock head module fed the gathered hidden states,
  `vp_dist.train.model.mlm_head_at`; the same loss, since unlabelled positions are ignored);
- eval latency at `--eval-batch` x `--eval-seq` (default 1 x 384), no grad: median seconds of
  eval forwards repeated on the trained model in eval mode (`eval_latency_s`: what serving sees;
  the squeezed modules' eval caches are warm), and of the first eval forward after each training
  step (`eval_latency_after_step_s`: the parameters just changed, so those caches are rebuilt);
- the same eval latency for the encoder alone (`eval_encoder_latency_s`, eager: `model.bert`,
  embeddings and layers without the MLM head), which is what a fine-tuned task model runs before its
  small head (SQuAD's span head is 2 units; the paper's Table 2 is SQuAD), while the MLM head's
  vocabulary GEMM at every position, unchanged by pruning, is a large share of the `eval_latency_s`
  forward; each with its FLOP ratio (`squeezed_over_dense_eval_flops`, `..._eval_encoder_flops`);
- host work: `ops_per_train_step`, the aten ops one training step dispatches (forward, backward,
  optimizer; each launches at least one kernel on a GPU, where a small step waits on them), and
  `ops_per_forward_backward`, the same without the optimizer step: the models' own count, the same
  on every device (the optimizer's share is not: the CPU's AdamW runs about ten ops per parameter
  tensor, the fused CUDA one a few launches for all of them);
- FLOPs of one training step counted by `torch.utils.flop_counter` (matmuls and attention): the
  squeezed/dense FLOP ratio is the limit a perfect implementation would reach, printed next to
  the measured time ratio;
- the squeezed attention's QKV GEMM rows (`attention_qkv_rows`): dense's, what the heads need,
  and what the padded head layout computes (the difference is zero rows, summed over the layers);
- memory: parameter + gradient + optimizer-state bytes; on `--device cuda` also
  `torch.cuda.max_memory_allocated` during the model's training step (and its excess over what was
  allocated before the step); on CPU the process's peak RSS (both models together).
With `--cuda-graph` (CUDA only) the eval forward of each model is also captured once in a
`torch.cuda.CUDAGraph` (same `--eval-batch` x `--eval-seq` input every replay, passed without an
attention mask: the eval batch has no padding, and Hugging Face's mask code may sync with the host,
which capture forbids) and replays are timed: median of `--repeats`. That removes the launch
overhead that dominates small eval batches on a GPU. The squeezed graph includes the kernels that
build the fused QKV and attn_out weights (the eval caches are not used under capture). A model whose capture fails is reported
under `eval_graph_error` ("Type: message"); the rest of the result is unaffected.
A second capture times the squeezed model with its derived weights frozen
(`vp_dist.squeeze.freeze_eval_tensors`: built once, read by the graph, as a server would run it):
`eval_latency_graph_s["squeezed_frozen"]`. The encoders are captured the same way (`eval_encoder_latency_graph_s`).
With `--compile MODE` each model's forward runs through `torch.compile(mode=MODE)` in the training
step and the eval forward (compile time, in the warm-up, is reported as `compile_s`; the encoder-alone
eval stays eager).
With `--profile N` one training step of each model is also profiled (`torch.profiler`) and its N
ops with the most self time (on a GPU: kernels, by device time) are reported, with their share;
`profile_totals` gives the step's wall time next to the ranked total (on a GPU: the busy time).
`--pad-ffn N` pads each folded FFN's inner width with zero units to a multiple of N (exact).
`--head-pad N` rounds the shrunk attention's head widths up to a multiple of N (default 8; 1: the
widths the heads need, no zero columns; exact either way).
`--flops-only` stops after the counts (FLOPs, parameters, attention rows): they are the same on any
device, so a CPU gives BERT-large's for the GPU's shapes.
Masks: `--masks vp` (default) chooses rows by Variance Pruning from the statistics of
`--vp-steps` forward passes of the (random-init) model; `--masks random` prunes exactly
`--sparsity` of every layer's rows at random. Prints one JSON line (and writes it to `--json`).

    python launch/bench_squeeze.py --shape bert-base --layers 4 --batch 8 --seq 128 --repeats 5
    python launch/bench_squeeze.py --device cuda --dtype bf16 --shape bert-large --batch 32 --seq 128 --json out.json
    python launch/bench_squeeze.py --device cuda --dtype bf16 --shape bert-large --cuda-graph
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
from pathlib import Path
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist import VariancePruner, VPConfig  # noqa: E402
from vp_dist.adapters import fold_sites, prunable_layers  # noqa: E402
from vp_dist.cli import nonnegative_int, open_fraction, positive_int  # noqa: E402
from vp_dist.squeeze import count_parameters, freeze_eval_tensors, squeeze_model  # noqa: E402
from vp_dist.squeeze import attention as squeeze_attention  # noqa: E402
from vp_dist.squeeze import layers as squeeze_layers  # noqa: E402
from vp_dist.train.loop import labelled_positions  # noqa: E402
from vp_dist.train.model import mlm_head_at  # noqa: E402

SHAPES = {  # the pre-training presets' widths (vp_dist.train.model.PRESETS)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_masks(model, sparsity: float, seed: int) -> dict[str, torch.Tensor]:
    """Exactly round(sparsity * rows) rows of every prunable layer pruned, at random."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in prunable_layers(model):
        rows = layer.module.weight.shape[0]
        kept = torch.ones(rows, dtype=torch.bool)
        kept[torch.randperm(rows, generator=generator)[: round(sparsity * rows)]] = False
        masks[layer.name] = kept
    return masks


def vp_masks(model, sparsity: float, batches: list[dict], steps: int, align: int = 1) -> dict[str, torch.Tensor]:
    """Masks Variance Pruning chooses (global per type) after `steps` observed forward passes."""
    pruner = VariancePruner(model, VPConfig(start=steps, interval=1, increment=sparsity, target=sparsity,
                                            align=align))
    with torch.no_grad():
        for step in range(steps):
            batch = batches[step % len(batches)]
            with pruner.observe(batch["attention_mask"]):
                model(**batch)
            pruner.step()
    pruner._detach_hooks()
    return pruner.masks()


def state_bytes(model, optimizer) -> int:
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
    return sum(t.numel() * t.element_size() for t in tensors)


def make_batch(vocab: int, batch: int, seq: int, seed: int, device, labelled: float = 1.0) -> dict:
    """Random tokens, no padding; `labels` at round(labelled * seq) random positions of each row
    (-100 elsewhere), all positions at 1.0."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch, seq), generator=generator)
    labels = input_ids.clone()
    if labelled < 1.0:
        order = torch.rand(batch, seq, generator=generator).argsort(dim=1)
        labels.scatter_(1, order[:, round(labelled * seq):], -100)
    return {k: v.to(device) for k, v in {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                                          "labels": labels}.items()}


def mlm_loss(model, batch: dict, positions: torch.Tensor | None) -> torch.Tensor:
    """The MLM loss; with `positions` (flat indices of the labelled positions, taken on the host)
    the head runs at those positions only, as vp-dist's pre-training loop runs it."""
    if positions is None:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with mlm_head_at(model, positions):
        logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"].reshape(-1).index_select(0, positions))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bert-base")
    parser.add_argument("--layers", type=positive_int, default=None, help="encoder layers (default: the shape's)")
    parser.add_argument("--vocab", type=positive_int, default=30522, help="vocabulary of the MLM head")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--eval-batch", type=positive_int, default=1)
    parser.add_argument("--eval-seq", type=positive_int, default=384)
    parser.add_argument("--head-positions", choices=("all", "labelled"), default="all",
                        help="where the MLM head runs in the training step: every position (Hugging Face's "
                        "loss) or the labelled 15%% only (vp-dist's pre-training loop)")
    parser.add_argument("--sparsity", type=open_fraction, default=0.5)
    parser.add_argument("--masks", choices=("vp", "random"), default="vp")
    parser.add_argument("--vp-steps", type=positive_int, default=2, help="observed forward passes for --masks vp")
    parser.add_argument("--align", type=positive_int, default=1, help="VPConfig.align (--masks vp): kept rows per layer "
                        "rounded up to a multiple")
    parser.add_argument("--pad-ffn", type=positive_int, default=1,
                        help="VPConfig.pad_ffn: each folded FFN's inner width padded with zero units to a "
                        "multiple (exact; the masks keep SPEC 3's counts)")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--profile", type=nonnegative_int, default=0, metavar="N",
                        help="also profile one training step of each model (torch.profiler) and report its N "
                        "ops with the most self time, with their share of the step (`profile` in the JSON)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None,
                        help="run each model's forward through torch.compile(mode=...) in the training step and "
                        "the eval forward (the FLOP count and the CUDA-graph replays stay eager); compilation "
                        "happens in the warm-up, and its seconds are reported (`compile_s`)")
    parser.add_argument("--head-widths", choices=("split", "equal", "grouped"), default="split",
                        help="the shrunk attention's padded head widths (vp_dist.squeeze.attention.HEAD_WIDTHS): "
                             "score and value widths each as the heads need (split), one for both (equal), or "
                             "heads in up to 3 groups with their own widths (grouped)")
    parser.add_argument("--head-pad", type=positive_int, default=squeeze_attention.PAD_MULTIPLE,
                        help="the multiple the shrunk attention's head widths are rounded up to "
                        "(vp_dist.squeeze.attention.PAD_MULTIPLE; 1: the widths the heads need, no zero "
                        "columns; exact either way)")
    parser.add_argument("--gemm-pad", choices=("default", "off", "cached", "always"), default="default",
                        help="exact GEMM-width padding of the squeezed layers (vp_dist.squeeze.layers): the "
                        "library's default for the device, none, only where the padded weight is built once "
                        "(eval cache, frozen), or in every forward (training too)")
    parser.add_argument("--flops-only", action="store_true",
                        help="count FLOPs (training step; eval with and without the MLM head), parameters and "
                        "attention rows, and time nothing: the same figures on any device, e.g. BERT-large's on a CPU")
    parser.add_argument("--cuda-graph", action="store_true", help="also time the eval forward replayed from a "
                        "CUDA graph (CUDA only)")
    args = parser.parse_args(argv)
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error(f"--cuda-graph needs a CUDA device (--device cuda), not --device {args.device}: "
                     f"CUDA graphs capture GPU work")
    if args.compile and args.head_positions != "all":
        parser.error("--compile runs the stock model (--head-positions all): the labelled-positions head "
                     "is a forward hook added around each step")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, cuda = torch.device(args.device), DTYPES[args.dtype], args.device.startswith("cuda")
    set_gemm_padding(args.gemm_pad, device.type)
    squeeze_attention.HEAD_WIDTHS = args.head_widths
    squeeze_attention.PAD_MULTIPLE = args.head_pad

    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    config = BertConfig(vocab_size=args.vocab, max_position_embeddings=max(512, args.seq, args.eval_seq),
                        **shape)
    torch.manual_seed(0)
    dense = BertForMaskedLM(config).to(device)
    labelled = 0.15 if args.head_positions == "labelled" else 1.0
    batch = make_batch(args.vocab, args.batch, args.seq, 1, device, labelled)
    positions = labelled_positions(batch["labels"].cpu()).to(device) if labelled < 1.0 else None
    if args.masks == "vp":
        batches = [make_batch(args.vocab, args.batch, args.seq, 100 + i, device) for i in range(args.vp_steps)]
        masks = vp_masks(copy.deepcopy(dense), args.sparsity, batches, args.vp_steps, args.align)
    elif args.align > 1:
        parser.error("--align needs --masks vp")
    else:
        masks = random_masks(dense, args.sparsity, 0)
    squeezed = copy.deepcopy(dense)
    with torch.no_grad():
        for layer in prunable_layers(squeezed):
            kept = masks[layer.name].to(device)
            layer.module.weight[~kept] = 0
    squeeze_model(squeezed, {k: v.to(device) for k, v in masks.items()}, fold_sites(squeezed), args.pad_ffn)
    models = {"dense": dense.to(dtype).train(), "squeezed": squeezed.to(dtype).train()}
    # On a GPU the fused AdamW (one kernel for all parameters), as DeepSpeed's FusedAdam trains.
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True if cuda else None)
                  for name, m in models.items()}
    # What the steps call: the models, or their compiled forwards (same parameters, same optimizer).
    runners = {name: torch.compile(m, mode=args.compile, dynamic=False) if args.compile else m
               for name, m in models.items()}
    eval_batch = make_batch(args.vocab, args.eval_batch, args.eval_seq, 2, device)
    eval_batch.pop("labels")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def train_step(name: str) -> float:
        optimizer = optimizers[name]
        sync()
        start = time.perf_counter()
        mlm_loss(runners[name], batch, positions).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the footprint
        sync()
        return time.perf_counter() - start

    def eval_latency(name: str, back_to_train: bool = True, encoder: bool = False) -> float:
        models[name].eval()
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            (models[name].base_model if encoder else runners[name])(**eval_batch)
        sync()
        if back_to_train:
            models[name].train()
        return time.perf_counter() - start

    flops = {}
    for name, model in models.items():
        counter = FlopCounterMode(display=False)
        with counter:
            mlm_loss(model, batch, positions).backward()
        model.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops()

    eval_flops = {"mlm": {}, "encoder": {}}  # one eval forward at the eval shape, with and without the MLM head
    for name, model in models.items():
        for form, module in (("mlm", model), ("encoder", model.base_model)):
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                module.eval()(**eval_batch)
            eval_flops[form][name] = counter.get_total_flops()
        model.train()
    result = {
        "benchmark": "dense_vs_squeezed", "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "shape": {**shape, "vocab": args.vocab},
        "batch": args.batch, "seq": args.seq, "head_positions": args.head_positions, "eval_batch": args.eval_batch, "eval_seq": args.eval_seq,
        "masks": args.masks, "sparsity": args.sparsity, "align": args.align, "pad_ffn": args.pad_ffn,
        "head_widths": args.head_widths,
        "head_pad": args.head_pad,
        "gemm_pad": {"mode": args.gemm_pad, "padded": device.type in squeeze_layers.GEMM_PAD_DEVICES,
                     "in_training": device.type in squeeze_layers.GEMM_PAD_UNCACHED},
        "kept_fraction_by_type": _kept_by_type(dense, masks),
        "squeezed_over_dense_train_flops": _ratio(flops),
        "squeezed_over_dense_eval_flops": _ratio(eval_flops["mlm"]),
        "squeezed_over_dense_eval_encoder_flops": _ratio(eval_flops["encoder"]),
        "train_flops": flops,
        "eval_flops": eval_flops,
        "parameters": {name: count_parameters(m) for name, m in models.items()},
        "attention_qkv_rows": _qkv_rows(models["squeezed"], shape),
    }
    if args.flops_only:  # what the masks and the layout allow, on any device: nothing timed
        return _emit(result, args.json)

    peak, above, compile_s = {}, {}, {}
    for name in models:
        started = time.perf_counter()
        for _ in range(args.warmup if not args.compile else max(2, args.warmup)):
            train_step(name), eval_latency(name)
        compile_s[name] = time.perf_counter() - started
        if cuda:
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            train_step(name)
            peak[name] = torch.cuda.max_memory_allocated()
            above[name] = peak[name] - resident
    times = {name: [] for name in models}
    after_step = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:  # interleaved
            times[name].append(train_step(name))
            after_step[name].append(eval_latency(name))

    def eval_medians(encoder: bool) -> dict[str, float]:
        """Median eval latency per model, interleaved after a warm-up; the models stay in eval mode."""
        for _ in range(args.warmup):
            for name in models:
                eval_latency(name, back_to_train=False, encoder=encoder)
        latency = {name: [] for name in models}
        for _ in range(args.repeats):
            for name in models:
                latency[name].append(eval_latency(name, back_to_train=False, encoder=encoder))
        return {name: statistics.median(t) for name, t in latency.items()}

    eval_s = eval_medians(encoder=False)
    # the encoder alone (eager), what a fine-tuned task model runs before its small head
    eval_encoder_s = eval_medians(encoder=True)
    for model in models.values():
        model.train()

    step = {name: statistics.median(t) for name, t in times.items()}
    eval_after_step = {name: statistics.median(t) for name, t in after_step.items()}
    result.update({
        "repeats": args.repeats,
        "train_step_s": {k: round(v, 5) for k, v in step.items()},
        "eval_latency_s": {k: round(v, 5) for k, v in eval_s.items()},
        "eval_latency_after_step_s": {k: round(v, 5) for k, v in eval_after_step.items()},
        "squeezed_over_dense_train_time": _ratio(step),
        "squeezed_over_dense_eval_time": _ratio(eval_s),
        "eval_encoder_latency_s": {k: round(v, 5) for k, v in eval_encoder_s.items()},
        "squeezed_over_dense_eval_encoder_time": _ratio(eval_encoder_s),
        "state_bytes": {name: state_bytes(m, optimizers[name]) for name, m in models.items()},
    })
    # Host work: aten ops called from Python or autograd in one training step (each launches at
    # least one kernel on a GPU; at small steps the GPU waits on them, see the README's GPU section).
    result["ops_per_train_step"] = {name: top_level_ops(lambda: train_step(name)) for name in models}
    result["ops_per_forward_backward"] = {
        name: top_level_ops(lambda: mlm_loss(runners[name], batch, positions).backward()) for name in models}
    for optimizer in optimizers.values():  # the gradients those passes left
        optimizer.zero_grad(set_to_none=False)
    if args.profile:
        profiles = {name: profile_step(lambda: train_step(name), args.profile, cuda) for name in models}
        result["profile"] = {name: ops for name, (ops, _) in profiles.items()}
        result["profile_totals"] = {name: totals for name, (_, totals) in profiles.items()}
    if args.compile:
        result["compile"] = args.compile
        result["compile_s"] = {k: round(v, 1) for k, v in compile_s.items()}  # the warm-up steps, compilation included
    if args.cuda_graph:
        inputs = {"input_ids": eval_batch["input_ids"]}
        result.update(graph_eval_latency(models, inputs, args.warmup, args.repeats))
        encoders = {name: model.base_model for name, model in models.items()}
        result.update(graph_eval_latency(encoders, inputs, args.warmup, args.repeats, what="eval_encoder"))
    if cuda:
        result["max_memory_allocated_bytes"] = peak
        result["step_peak_above_resident_bytes"] = above
    else:
        result["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _emit(result, args.json)


def _ratio(pair: dict) -> float:
    """Squeezed over dense, to 3 places."""
    return round(pair["squeezed"] / pair["dense"], 3)


def _emit(result: dict, path: str | None) -> dict:
    """Print `result` as one JSON line, and write it to `path` where given."""
    line = json.dumps(result)
    print(line)
    if path:
        with open(path, "w") as handle:
            handle.write(line + "\n")
    return result


def set_gemm_padding(mode: str, device: str) -> None:
    """`--gemm-pad`: set vp_dist.squeeze.layers' padding switches for `device` (this process only)."""
    if mode == "default":
        return
    pad_devices, uncached = set(squeeze_layers.GEMM_PAD_DEVICES), set(squeeze_layers.GEMM_PAD_UNCACHED)
    (pad_devices.discard if mode == "off" else pad_devices.add)(device)
    (uncached.add if mode == "always" else uncached.discard)(device)
    squeeze_layers.GEMM_PAD_DEVICES, squeeze_layers.GEMM_PAD_UNCACHED = pad_devices, uncached


def top_level_ops(step) -> int:
    """aten ops with no aten op above them in one call of `step` (forward, backward, optimizer)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    count = 0
    for event in profiler.events():
        if event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            count += parent is None
    return count


# GEMM kernels by name (cuBLAS/cuBLASLt: nvjet, *gemm*, cutlass, xmma), not fused attention's.
GEMM_KERNEL_MARKERS = ("gemm", "nvjet", "cutlass", "xmma", "cublas")
ATTENTION_KERNEL_MARKERS = ("fmha", "flash", "attention", "sdpa")
CPU_GEMM_OPS = ("aten::mm", "aten::addmm")


def is_gemm(name: str, cuda: bool) -> bool:
    """Whether a profiled op (CPU: aten op; GPU: kernel name) is a projection or head GEMM (not the
    attention's score/context products)."""
    if not cuda:
        return name in CPU_GEMM_OPS
    name = name.lower()
    return any(m in name for m in GEMM_KERNEL_MARKERS) and not any(m in name for m in ATTENTION_KERNEL_MARKERS)


def profile_step(step, top: int, cuda: bool) -> tuple[list[dict], dict]:
    """The `top` ops with the most self time in one call of `step`: self CPU time of aten ops, or
    on a GPU the kernels' device time (kernels and copies only, no user-annotation ranges such as
    the optimizer step's, so that no time is counted twice): name, calls, milliseconds and percent
    of the total. Also (second value) the step's wall-clock milliseconds, the total of what was
    ranked (on a GPU: the time the GPU was busy; far below the wall time means the step waits on
    the host, e.g. on kernel launches) and `gemm_ms`, the part of it spent in GEMMs (`is_gemm`):
    what pruning shrinks; the rest (head softmax, LayerNorms, residual adds, dropout, optimizer,
    embeddings) it mostly does not."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        wall = step()
    events = profiler.key_averages()
    if cuda:
        events = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        attribute = "device_time_total"
    else:
        attribute = "self_cpu_time_total"
    total = sum(getattr(e, attribute) for e in events) or 1.0
    gemm = sum(getattr(e, attribute) for e in events if is_gemm(e.key, cuda))
    ranked = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:top]
    ops = [{"op": e.key[:160], "calls": e.count, "ms": round(getattr(e, attribute) / 1000, 3),
            "percent": round(100 * getattr(e, attribute) / total, 2)} for e in ranked]
    return ops, {"wall_ms": round(1000 * wall, 3), "ranked_total_ms": round(total / 1000, 3),
                 "gemm_ms": round(gemm / 1000, 3)}


def graph_eval_latency(models: dict, inputs: dict, warmup: int, repeats: int, what: str = "eval") -> dict:
    """Median seconds of one CUDA-graph replay of each model's eval forward (the same `inputs` each
    time), as `{what}_latency_graph_s`, with the squeezed/dense ratio; a model whose capture or replay
    fails is reported under `{what}_graph_error` instead. `what`: "eval" (the models), "eval_encoder"
    (their encoders)."""
    latency, errors = {}, {}
    runs = [(name, model, False) for name, model in models.items()] + [("squeezed_frozen", models["squeezed"], True)]
    for name, model, frozen in runs:
        try:
            latency[name] = _graph_replay_seconds(model, inputs, warmup, repeats, frozen)
        except Exception as error:  # noqa: BLE001 (reported, the rest of the benchmark goes on)
            errors[name] = f"{type(error).__name__}: {error}".strip()
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
        finally:
            model.train()
    out = {f"{what}_latency_graph_s": {k: round(v, 6) for k, v in latency.items()}}
    for name in ("squeezed", "squeezed_frozen"):
        if "dense" in latency and name in latency:
            out[f"{name}_over_dense_{what}_graph_time"] = round(latency[name] / latency["dense"], 3)
    if errors:
        out[f"{what}_graph_error"] = errors
    return out


def _graph_replay_seconds(model, inputs: dict, warmup: int, repeats: int, frozen: bool = False) -> float:
    model.eval()
    if frozen:  # serving: the squeezed modules' derived weights built once, read by the graph
        freeze_eval_tensors(model)
    static = {k: v.clone() for k, v in inputs.items()}
    with torch.no_grad():
        # Warm up on a side stream (as the CUDA graphs docs show): lazy initialisation and cuBLAS
        # workspaces are set up before capture. The squeezed modules do not read their eval caches
        # while capturing: the graph rebuilds their derived weights, so replays follow the parameters.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(3, warmup)):
                model(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**static)
    for _ in range(max(1, warmup)):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del graph
    return statistics.median(times)  # the caller's model.train() thaws frozen tensors


def _qkv_rows(model, shape: dict) -> dict[str, int]:
    """QKV GEMM rows summed over the layers: dense (3 x hidden each); squeezed, what the shrunk
    attention blocks' heads need and what their padded head-order layout computes (the difference:
    zero rows, `SqueezedBertAttention.qkv_row_counts`; blocks left unshrunk count 3 x hidden)."""
    blocks = [m for m in model.modules() if isinstance(m, squeeze_attention.SqueezedBertAttention)]
    counts = [block.qkv_row_counts() for block in blocks]
    full = 3 * shape["hidden_size"] * (shape["num_hidden_layers"] - len(blocks))
    return {"dense": 3 * shape["hidden_size"] * shape["num_hidden_layers"],
            "needed": full + sum(need for need, _ in counts), "computed": full + sum(rows for _, rows in counts)}


def _kept_by_type(model, masks) -> dict[str, float]:
    kept, total = {}, {}
    for layer in prunable_layers(model):
        kept[layer.projection_type] = kept.get(layer.projection_type, 0) + int(masks[layer.name].sum())
        total[layer.projection_type] = total.get(layer.projection_type, 0) + masks[layer.name].numel()
    return {t: round(kept[t] / total[t], 4) for t in kept}


if __name__ == "__main__":
    main()
