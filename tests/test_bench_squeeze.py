"""launch/bench_squeeze.py runs end to end (tiny shape) and reports times, FLOPs and memory."""
import json
import sys
from pathlib import Path

import pytest

from helpers import load_script, run_ok

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("masks,align", [("vp", 1), ("random", 1), ("vp", 8)])
def test_bench_squeeze_reports_time_flops_and_memory(tmp_path, masks, align):
    out = tmp_path / "bench.json"
    run_ok([sys.executable, str(ROOT / "launch/bench_squeeze.py"), "--shape", "tiny", "--layers", "2",
            "--vocab", "500", "--batch", "2", "--seq", "16", "--eval-seq", "24", "--repeats", "1",
            "--warmup", "1", "--threads", "1", "--masks", masks, "--align", str(align), "--profile", "3", "--json", str(out)], cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["align"] == align
    if align == 1:  # SPEC 3's exact counts
        assert result["kept_fraction_by_type"] == pytest.approx(
            {t: 0.5 for t in result["kept_fraction_by_type"]}, abs=1e-9)
    else:  # each layer's kept rows rounded up to a multiple of 8: at least half kept, never less
        assert all(0.5 <= f <= 0.75 for f in result["kept_fraction_by_type"].values()), result["kept_fraction_by_type"]
    for name in ("dense", "squeezed"):
        assert result["train_step_s"][name] > 0 and result["eval_latency_s"][name] > 0
        assert result["eval_latency_after_step_s"][name] > 0 and result["eval_encoder_latency_s"][name] > 0
    # eval without the MLM head (unchanged by pruning): less work, a smaller FLOP ratio
    eval_flops = result["eval_flops"]
    assert all(eval_flops["encoder"][name] < eval_flops["mlm"][name] for name in ("dense", "squeezed"))
    assert 0 < result["squeezed_over_dense_eval_encoder_flops"] < result["squeezed_over_dense_eval_flops"] < 1
    assert result["squeezed_over_dense_eval_encoder_time"] > 0
    assert "eval_latency_graph_s" not in result  # --cuda-graph only
    for name in ("dense", "squeezed"):  # --profile 3: the step's three costliest ops, costliest first
        ops = result["profile"][name]
        assert len(ops) == 3 and all(op["calls"] > 0 and 0 < op["percent"] <= 100 for op in ops)
        assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
        totals = result["profile_totals"][name]
        assert totals["wall_ms"] > 0 and sum(op["ms"] for op in ops) <= totals["ranked_total_ms"] + 1e-3
        assert 0 < totals["gemm_ms"] < totals["ranked_total_ms"]  # aten::mm / addmm, part of the whole
    # AdamW in fp32: weight, gradient and two moments per parameter, 16 bytes, plus a step count each.
    parameters = result["parameters"]
    assert result["state_bytes"]["dense"] >= 16 * parameters["dense"]
    assert result["state_bytes"]["dense"] <= 16 * parameters["dense"] + 8 * 200
    assert result["state_bytes"]["squeezed"] < 0.8 * result["state_bytes"]["dense"]
    assert result["process_peak_rss_bytes"] > result["state_bytes"]["dense"]
    assert 0.1 < result["squeezed_over_dense_train_flops"] < 0.9
    assert result["train_flops"]["squeezed"] < result["train_flops"]["dense"]
    for name in ("dense", "squeezed"):  # the optimizer step (CPU AdamW: ops per parameter tensor) comes on top
        assert 0 < result["ops_per_forward_backward"][name] < result["ops_per_train_step"][name]
    rows = result["attention_qkv_rows"]  # tiny: hidden 128, 2 layers; the padded layout computes zero rows
    assert rows["dense"] == 3 * 128 * 2 and 0 < rows["needed"] <= rows["computed"] < rows["dense"]


def test_bench_squeeze_pads_the_ffn_without_changing_the_masks():
    """--pad-ffn 8: the same VP masks (SPEC 3's counts), a few zero units more in the squeezed model."""
    bench = _bench_module()
    common = ["--device", "cpu", "--shape", "tiny", "--layers", "2", "--vocab", "500", "--batch", "2", "--seq", "16",
              "--eval-seq", "24", "--repeats", "1", "--warmup", "1"]
    results = {pad: bench.main([*common, "--pad-ffn", str(pad)]) for pad in (1, 8)}
    assert results[8]["pad_ffn"] == 8 and results[1]["pad_ffn"] == 1
    assert results[8]["kept_fraction_by_type"] == results[1]["kept_fraction_by_type"]
    extra = results[8]["parameters"]["squeezed"] - results[1]["parameters"]["squeezed"]
    # at most 7 zero units per layer, each an FFN-in row (128 weights and a bias) and an FFN-out column
    assert 0 < extra <= 2 * 7 * (128 + 1 + 128), extra
    assert results[8]["parameters"]["dense"] == results[1]["parameters"]["dense"]


def _bench_module():
    return load_script(ROOT / "launch/bench_squeeze.py")


def test_gemm_kernels_are_told_from_attention_and_elementwise_kernels():
    bench = _bench_module()
    # kernel names from the 2026-12-04 H200 profile (bench_squeeze --profile 15), and fused attention's
    for name in ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT",
                 "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_64x3_nt_align2>(...)",
                 "void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm_bf16_256x128_nn_align1>(...)",
                 "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"):
        assert bench.is_gemm(name, cuda=True), name
    for name in ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0",
                 "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)",
                 "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>(...)",
                 "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, ...>>(...)",
                 "Memcpy DtoD (Device -> Device)"):
        assert not bench.is_gemm(name, cuda=True), name
    assert bench.is_gemm("aten::addmm", cuda=False) and not bench.is_gemm("aten::bmm", cuda=False)


def test_bench_squeeze_refuses_cuda_graph_on_cpu(capsys):
    bench = _bench_module()
    with pytest.raises(SystemExit) as exit_info:  # refused by the parser, before any model is built
        bench.main(["--device", "cpu", "--shape", "tiny", "--layers", "1", "--cuda-graph"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "--cuda-graph needs a CUDA device" in captured.err and captured.out == ""


def test_graph_eval_latency_reports_a_failed_capture_instead_of_raising():
    """A model whose capture fails (here: no CUDA at all) is reported as "Type: message"."""
    import torch

    from models import tiny_model
    bench = _bench_module()
    models = {"dense": tiny_model("bert-mlm"), "squeezed": tiny_model("bert-mlm", seed=1)}
    result = bench.graph_eval_latency(models, {"input_ids": torch.randint(5, 90, (1, 8))}, warmup=1, repeats=1)
    if torch.cuda.is_available():
        assert set(result["eval_latency_graph_s"]) == {"dense", "squeezed", "squeezed_frozen"}
        return
    assert result["eval_latency_graph_s"] == {} and "squeezed_over_dense_eval_graph_time" not in result
    assert set(result["eval_graph_error"]) == {"dense", "squeezed", "squeezed_frozen"}
    assert all(": " in message for message in result["eval_graph_error"].values())
    assert all(m.training for m in models.values())  # handed back in training mode
    encoders = {name: model.base_model for name, model in models.items()}  # the encoders, under their own keys
    result = bench.graph_eval_latency(encoders, {"input_ids": torch.randint(5, 90, (1, 8))}, warmup=1, repeats=1,
                                      what="eval_encoder")
    assert set(result) == {"eval_encoder_latency_graph_s", "eval_encoder_graph_error"}
    assert set(result["eval_encoder_graph_error"]) == {"dense", "squeezed", "squeezed_frozen"}


def test_flops_only_counts_without_timing(capsys):
    """--flops-only: the FLOP ratios, parameters and attention rows a timed run reports, nothing timed."""
    bench = _bench_module()
    argv = ["--shape", "tiny", "--layers", "2", "--vocab", "500", "--batch", "2", "--seq", "16", "--eval-seq", "24",
            "--threads", "1"]
    counted = bench.main(argv + ["--flops-only"])
    assert not any(key.endswith(("_s", "_time")) for key in counted), sorted(counted)
    timed = bench.main(argv + ["--repeats", "1", "--warmup", "0"])
    for key in ("train_flops", "eval_flops", "parameters", "attention_qkv_rows", "squeezed_over_dense_train_flops",
                "squeezed_over_dense_eval_flops", "squeezed_over_dense_eval_encoder_flops", "kept_fraction_by_type"):
        assert counted[key] == timed[key], key
    capsys.readouterr()


def test_head_at_labelled_positions_gives_hugging_faces_loss_with_fewer_flops():
    """`--head-positions labelled` runs the stock MLM head on the labelled positions only: the loss
    equals `BertForMaskedLM`'s own (which ignores the unlabelled positions), the head's FLOPs fall."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import tiny_model
    bench = _bench_module()
    model = tiny_model("bert-mlm").eval()
    batch = bench.make_batch(model.config.vocab_size, 3, 20, seed=4, device="cpu", labelled=0.15)
    labelled = batch["labels"] != -100
    assert labelled.sum(dim=1).tolist() == [3, 3, 3]  # round(0.15 * 20) per row
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])
    positions = bench.labelled_positions(batch["labels"])
    flops = {}
    for name, where in (("all", None), ("labelled", positions)):
        with FlopCounterMode(display=False) as counter:
            loss = bench.mlm_loss(model, batch, where)
        flops[name] = (loss, counter.get_total_flops())
    torch.testing.assert_close(flops["labelled"][0], flops["all"][0], rtol=1e-6, atol=1e-6)
    assert flops["labelled"][1] < flops["all"][1]


@pytest.mark.slow
def test_compile_option_times_compiled_models_and_reports_compile_seconds():
    """`--compile` runs both models' forwards through torch.compile (here the eager backend's
    stand-in is not used: inductor on the CPU, 1 tiny layer) and reports the warm-up seconds."""
    bench = _bench_module()
    result = bench.main(["--device", "cpu", "--shape", "tiny", "--layers", "1", "--vocab", "128", "--batch", "2",
                         "--seq", "16", "--eval-seq", "16", "--repeats", "1", "--warmup", "1", "--masks", "random",
                         "--compile", "default"])
    assert result["compile"] == "default" and set(result["compile_s"]) == {"dense", "squeezed"}
    assert all(v > 0 for v in result["train_step_s"].values())


def test_gemm_alignment_benchmark_times_each_width_and_its_rounded_up_widths():
    module = load_script(ROOT / "launch" / "bench_gemm_align.py")
    result = module.main(["--device", "cpu", "--dtype", "fp32", "--tokens", "32", "--hidden", "16",
                          "--widths", "13,64", "--repeats", "2", "--warmup", "1"])
    assert [row["width"] for row in result["rows"]] == [13, 64]
    assert [(row["round8"]["k"], row["round64"]["k"]) for row in result["rows"]] == [(16, 64), (64, 64)]
    assert all(row[label]["seconds"] > 0 for row in result["rows"] for label in ("exact", "round8", "round64"))


def test_gemm_pad_option_pads_the_training_gemms_when_asked():
    """`--gemm-pad always` pads every squeezed GEMM width to a multiple of 8 in training too: the
    counted FLOPs grow (odd widths at 45% random pruning); `off` leaves them exact."""
    bench = _bench_module()
    common = ["--device", "cpu", "--shape", "tiny", "--layers", "1", "--vocab", "128", "--batch", "2", "--seq", "16",
              "--eval-seq", "16", "--repeats", "1", "--warmup", "0", "--masks", "random", "--sparsity", "0.45"]
    from vp_dist.squeeze import layers
    saved = (layers.GEMM_PAD_DEVICES, layers.GEMM_PAD_UNCACHED)
    try:
        padded = bench.main([*common, "--gemm-pad", "always"])
        exact = bench.main([*common, "--gemm-pad", "off"])
    finally:
        layers.GEMM_PAD_DEVICES, layers.GEMM_PAD_UNCACHED = saved
    assert padded["gemm_pad"] == {"mode": "always", "padded": True, "in_training": True}
    assert exact["gemm_pad"] == {"mode": "off", "padded": False, "in_training": False}
    assert padded["train_flops"]["squeezed"] > exact["train_flops"]["squeezed"]
    assert padded["train_flops"]["dense"] == exact["train_flops"]["dense"]


@pytest.mark.parametrize("widths", ["split", "equal"])
def test_squeezed_model_dispatches_few_ops_beyond_dense_per_layer(widths, monkeypatch):
    """Host work on a GPU: the squeezed model's forward + backward dispatches at most 20 aten ops per
    layer more than dense (measured 17: the derived weights' gathers and products, the expands).
    The bench's own count (`ops_per_forward_backward`), 3 tiny layers, split and one head width."""
    from vp_dist.squeeze import attention
    bench = _bench_module()
    # `--head-widths` sets the process-wide rule: restored afterwards for the worker's next tests.
    monkeypatch.setattr(attention, "HEAD_WIDTHS", attention.HEAD_WIDTHS)
    result = bench.main(["--device", "cpu", "--shape", "tiny", "--layers", "3", "--vocab", "128", "--batch", "1",
                         "--seq", "8", "--eval-seq", "8", "--repeats", "1", "--warmup", "1", "--masks", "random",
                         "--head-widths", widths])
    ops = result["ops_per_forward_backward"]
    assert ops["dense"] < ops["squeezed"] <= ops["dense"] + 20 * 3, ops


def test_head_pad_sets_the_head_width_multiple(monkeypatch, capsys):
    """`--head-pad 1` lays the heads out at the widths they need (no zero columns): fewer QKV rows
    and FLOPs than the default multiple of 8 on the same masks; the rows the heads need are the same.
    A multiple below 1 is refused before any work."""
    from vp_dist.squeeze import attention
    bench = _bench_module()
    monkeypatch.setattr(attention, "PAD_MULTIPLE", attention.PAD_MULTIPLE)
    monkeypatch.setattr(attention, "HEAD_WIDTHS", attention.HEAD_WIDTHS)
    common = ["--device", "cpu", "--shape", "mini", "--layers", "2", "--vocab", "128", "--batch", "2", "--seq", "16",
              "--eval-seq", "16", "--masks", "random", "--flops-only"]
    padded = bench.main([*common, "--head-pad", "8"])
    exact = bench.main([*common, "--head-pad", "1"])
    assert (padded["head_pad"], exact["head_pad"]) == (8, 1)
    assert exact["attention_qkv_rows"]["needed"] == padded["attention_qkv_rows"]["needed"]
    assert exact["attention_qkv_rows"]["computed"] < padded["attention_qkv_rows"]["computed"]
    assert exact["train_flops"]["squeezed"] < padded["train_flops"]["squeezed"]
    assert exact["train_flops"]["dense"] == padded["train_flops"]["dense"]
    with pytest.raises(SystemExit):
        bench.main([*common, "--head-pad", "0"])
    assert "argument --head-pad: 0 must be >= 1" in capsys.readouterr().err
