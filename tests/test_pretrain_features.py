"""BERT-large pre-training features: MLM head at masked positions only, activation checkpointing,
fp32 gradient accumulation under bf16."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import random_batch, tiny_model
from vp_dist import VPConfig, VariancePruner
from vp_dist.train.config import ModelSpec
from vp_dist.train.loop import grad_accum_dtype, labelled_positions, pretraining_loss
from vp_dist.train.model import build_model, mlm_head_at

ROOT = Path(__file__).resolve().parents[1]


def mlm_batch(seed=0, nsp=False):
    batch = random_batch(batch=3, seq=12, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(batch["labels"].shape, generator=g) < 0.25
    batch["labels"] = batch["labels"].masked_fill(~keep, -100)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    if nsp:
        batch["next_sentence_label"] = torch.tensor([0, 1, 0])
    return batch


def full_head_loss(model, batch, objective):
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
    logits = outputs.prediction_logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"].reshape(-1), ignore_index=-100)
    if objective == "mlm+nsp":
        loss = loss + torch.nn.functional.cross_entropy(outputs.seq_relationship_logits, batch["next_sentence_label"])
    return loss


@pytest.mark.parametrize("objective", ["mlm", "mlm+nsp"])
def test_masked_position_mlm_loss_and_gradients_equal_the_full_head(objective):
    batch = mlm_batch(nsp=objective == "mlm+nsp")
    model = tiny_model("bert-pretraining").eval()  # no dropout: both passes see the same function
    full = full_head_loss(model, batch, objective)
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    masked, positions = pretraining_loss(model, batch, objective, masked_positions_only=True)
    masked.backward()
    assert positions == int((batch["labels"] != -100).sum()) < batch["labels"].numel()
    torch.testing.assert_close(masked, full, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        if name in full_grads:
            torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    unmasked, positions = pretraining_loss(model, batch, objective, masked_positions_only=False)
    assert positions == batch["labels"].numel()
    torch.testing.assert_close(unmasked, full)


def test_masked_positions_taken_on_the_host_give_the_same_loss():
    """The training loop takes the labelled positions from the host batch before it moves to the
    device (no device sync for their count); the loss is the one computed from the labels."""
    batch = mlm_batch()
    model = tiny_model("bert-pretraining").eval()
    positions = labelled_positions(batch["labels"])
    assert positions.tolist() == torch.nonzero(batch["labels"].reshape(-1) != -100).flatten().tolist()
    given, count = pretraining_loss(model, batch, "mlm", masked_positions_only=True, positions=positions)
    computed, _ = pretraining_loss(model, batch, "mlm", masked_positions_only=True)
    assert count == positions.numel()
    torch.testing.assert_close(given, computed, rtol=0, atol=0)


def test_masked_position_head_computes_logits_only_there():
    model = tiny_model("bert-pretraining").eval()
    batch = mlm_batch()
    positions = torch.nonzero(batch["labels"].reshape(-1) != -100).flatten()
    with mlm_head_at(model, positions):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).prediction_logits
    assert logits.shape == (positions.numel(), model.config.vocab_size)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).prediction_logits
    assert full.shape[:2] == batch["input_ids"].shape  # the hook is gone after the block
    torch.testing.assert_close(logits, full.reshape(-1, full.shape[-1])[positions])
    with pytest.raises(ValueError, match="masked_positions_only=false"):
        with mlm_head_at(tiny_model("bert-cls"), positions):
            pass


def test_activation_checkpointing_recomputes_but_observes_each_forward_once():
    spec = ModelSpec(config="tiny", overrides={"hidden_size": 32, "num_attention_heads": 2,
                                               "intermediate_size": 64}, fused_layernorm="off")
    observed = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelSpec(**{**spec.__dict__, "gradient_checkpointing": checkpointing}), 97, 64)
        assert model.is_gradient_checkpointing is checkpointing
        model.train()
        calls = []
        model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *_: calls.append(1))
        pruner = VariancePruner(model, VPConfig(start=5, interval=5, increment=0.25, target=0.5))
        batch = mlm_batch()
        torch.manual_seed(1)
        with pruner.observe(batch["attention_mask"]):
            loss, _ = pretraining_loss(model, batch, "mlm")
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward when checkpointing
        pruner.step(torch.optim.SGD(model.parameters(), lr=0.0))
        observed[checkpointing] = (pruner.meters.window_count.clone(), pruner.meters.window_sum.clone(),
                                   pruner.meters.ewmv.clone(), loss.detach(),
                                   model.bert.encoder.layer[1].output.dense.weight.grad.clone())
    for plain, checkpointed in zip(observed[False], observed[True]):
        torch.testing.assert_close(checkpointed, plain)


def test_grad_accum_dtype_is_fp32_under_bf16_where_deepspeed_offers_it():
    bf16 = {"bf16": {"enabled": True}}
    for stage in (1, 2, 3):
        assert grad_accum_dtype("auto", {**bf16, "zero_optimization": {"stage": stage}}) == "fp32"
    assert grad_accum_dtype("auto", {**bf16, "zero_optimization": {"stage": 0}}) is None
    assert grad_accum_dtype("auto", {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}) is None
    assert grad_accum_dtype("auto", {"zero_optimization": {"stage": 2}}) is None  # fp32 model
    configured = {**bf16, "zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}
    assert grad_accum_dtype("auto", configured) is None  # the DeepSpeed config's own choice stays
    assert grad_accum_dtype("bf16", {**bf16, "zero_optimization": {"stage": 2}}) == "bf16"
    with pytest.raises(ValueError, match="grad_accum_dtype='fp64'"):
        grad_accum_dtype("fp64", bf16)


@pytest.mark.slow
def test_activation_checkpointing_pretraining_run_end_to_end(tmp_path):
    """One process, tiny BERT, checkpointing on: prunes, squeezes and trains on; the same run
    without checkpointing gives the same losses and masks. (That the rebuilt engine keeps
    checkpointing is the rebuild's own test: vp_dist/distributed/rebuild.py.)"""
    from test_pretrain_launch import TINY, run_env
    reports = {}
    for checkpointing in ("true", "false"):
        out = tmp_path / f"gc_{checkpointing}"
        command = [sys.executable, str(ROOT / "launch/pretrain.py"), "--config", str(ROOT / "launch/configs/demo.yaml"),
                   "--deepspeed_config", str(ROOT / "ds_configs/zero2_cpu.json"), "--output_dir", str(out), *TINY,
                   "--model.gradient_checkpointing", checkpointing, "--render_report", "false",
                   "--checkpoint_every", "0"]
        done = subprocess.run(command, cwd=ROOT, env={**run_env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-6000:]
        reports[checkpointing] = json.loads((out / "vp_report.json").read_text())
        assert "TFLOP/s/GPU" in done.stderr and "| MFU n/a |" in done.stderr  # telemetry lines, CPU: no MFU
    on, off = reports["true"], reports["false"]
    assert on["run_config"]["model"]["gradient_checkpointing"] is True and on["squeezed"]
    assert [e["kept_rows"] for e in on["prune_events"]] == [e["kept_rows"] for e in off["prune_events"]]
    for a, b in zip(on["history"], off["history"]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)


def test_pruned_rows_check_reads_zero_and_catches_a_row_that_is_not():
    """The report's `pruned_rows` figure (vp_dist.train.verify), on a plain model + AdamW (the
    DeepSpeed stages run it in tests/test_collective_devices.py and launch/gpu_check.sh)."""
    import types

    from helpers import train
    from vp_dist.train.verify import pruned_rows_max_abs
    model = tiny_model("bert-mlm")
    pruner, optimizer, _ = train(model, VPConfig(start=2, interval=2, increment=0.25, target=0.5), steps=5)
    engine = types.SimpleNamespace(module=model, optimizer=optimizer)
    largest = pruned_rows_max_abs(pruner, engine)
    assert set(largest) == {"module_weight", "fp32_master", "exp_avg", "exp_avg_sq"}
    assert all(value == 0.0 for value in largest.values()), largest
    layer = pruner.layers[0]
    row = int(torch.nonzero(~pruner.masks()[layer.name])[0])
    optimizer.state[layer.module.weight]["exp_avg_sq"][row, 3] = 0.5   # a moment left behind
    assert pruned_rows_max_abs(pruner, engine)["exp_avg_sq"] == 0.5
    with torch.no_grad():
        layer.module.weight[row, 0] = -2.0
    assert pruned_rows_max_abs(pruner, engine)["module_weight"] == 2.0
