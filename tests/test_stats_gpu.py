"""GPU checks of the statistics (run by launch/gpu_check.sh: `python -m pytest -q -m gpu
tests/test_stats_gpu.py`): the Triton kernel against the torch reference, and no host
synchronisation in the hooks, `observe` or `pruner.step()` under torch.cuda.set_sync_debug_mode."""
import pytest
import torch

from models import random_batch, tiny_model
from vp_dist import VPConfig, VariancePruner
from vp_dist.stats_kernels import TRITON_AVAILABLE, shifted_moments_torch, shifted_moments_triton

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 1024), (1000, 300), (7, 4096), (1, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_kernel_matches_the_torch_reference(dtype, shape, masked):
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, width = shape
    centre = torch.randn(width, device="cuda", generator=g) * 100
    values = (centre + torch.randn(rows, width, device="cuda", generator=g)).to(dtype)
    shift = (centre + 0.1 * torch.randn(width, device="cuda", generator=g)).float()
    valid = (torch.rand(rows, device="cuda", generator=g) > 0.3).float() if masked else None
    want = shifted_moments_torch(values, valid, shift)
    got = shifted_moments_triton(values, valid, shift)
    for name, a, b in zip(("first", "second"), got, want):
        assert a.dtype == torch.float32 and a.shape == (width,)
        scale = float(b.abs().max()) + 1e-30
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton")
def test_triton_kernel_reads_a_strided_view():
    values = torch.randn(64, 2, 96, device="cuda")[:, 1, :]  # row stride 192
    shift = torch.zeros(96, device="cuda")
    for a, b in zip(shifted_moments_triton(values, None, shift), shifted_moments_torch(values, None, shift)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hooks_observe_and_step_never_synchronise_with_the_host():
    model = tiny_model("bert-mlm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).cuda()
    pruner = VariancePruner(model, VPConfig(start=100))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = {k: v.cuda() for k, v in random_batch().items()}
    for _ in range(3):  # warm-up: first steps centre each micro-batch; allocations happen once
        with pruner.observe(batch["attention_mask"]):
            model(**batch).loss.backward()
        optimizer.step()
        pruner.step(optimizer)
    outputs = [torch.randn(3, 12, layer.module.out_features, device="cuda", dtype=torch.bfloat16)
               for layer in pruner.layers]
    hooks = [pruner._make_hook(index) for index in range(len(pruner.layers))]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with pruner.observe(batch["attention_mask"]):
                for hook, layer, output in zip(hooks, pruner.layers, outputs):
                    hook(layer.module, (), output)
            pruner.step(optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    stats = pruner.statistics()
    assert all(bool(torch.isfinite(v).all()) for pair in stats.values() for v in pair)


def test_statistics_on_the_gpu_equal_those_on_the_cpu():
    """The pruner's GPU path (one Triton launch per layer into fp32 partials, counts per forward,
    folded once per step) gives the statistics of its CPU path (torch, folded per micro-batch) for
    the same model and batches, padding and gradient accumulation included."""
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("bert-mlm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).to(device)
        pruner = VariancePruner(model, VPConfig(start=100))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        for step in range(4):
            for micro in range(2):
                batch = {k: v.to(device) for k, v in random_batch(seed=10 * step + micro).items()}
                with pruner.observe(batch["attention_mask"]):
                    model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.step(optimizer)
        results[device] = {key: tuple(v.double().cpu() for v in pair) for key, pair in pruner.statistics().items()}
    assert results["cpu"].keys() == results["cuda"].keys()
    for key, pair in results["cpu"].items():
        for want, got in zip(pair, results["cuda"][key]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=key)
