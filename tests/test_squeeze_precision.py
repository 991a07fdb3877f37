"""Squeezed layers and the compact export under torch.autocast and in half-precision weights.

The reference is the masked model in fp32; a squeezed model in bf16 (autocast or bf16 weights)
must agree with it within bf16 tolerance, forward and backward. Before the deterministic scatter,
`index_add` refused a bf16 product into an fp32 bias (RuntimeError), so these tests crashed.
"""
import pytest
import torch

from helpers import loss_of, train
from models import random_batch, tiny_model
from vp_dist import SqueezedLinear, VPConfig
from vp_dist.export import squeezed_model

pytestmark = pytest.mark.usefixtures("one_thread")

# bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few roundings deep in a 2-layer model.
BF16 = dict(rtol=5e-2, atol=5e-2)


def _fp16_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        return True
    except RuntimeError:
        return False


DTYPES = [torch.bfloat16] + ([torch.float16] if _fp16_on_cpu() else [])


@pytest.fixture(scope="module")
def pruned_mlm():
    model = tiny_model("bert-mlm")
    pruner, _, _ = train(model, VPConfig(start=2, interval=2, increment=0.25, target=0.5), steps=4)
    model.eval()
    return model, pruner


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = loss_of(model, batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_squeezed_linear_output_has_the_autocast_dtype_and_backpropagates():
    layer = SqueezedLinear(torch.randn(3, 4), torch.randn(6), torch.tensor([0, 2, 5]))
    x = torch.randn(2, 5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((6,), 10.0))
    reference = torch.nn.functional.linear(x.detach(), layer.weight.detach()) + layer.bias.detach()[[0, 2, 5]]
    torch.testing.assert_close(y[..., [0, 2, 5]].float(), reference, **BF16)
    torch.testing.assert_close(y[..., [1, 3, 4]].float(), layer.bias.detach()[[1, 3, 4]].expand(2, 5, 3), **BF16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_squeezed_model_under_autocast_matches_the_fp32_masked_model(pruned_mlm, dtype):
    model, pruner = pruned_mlm
    small = pruner.squeeze()
    batch = random_batch(seed=5)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    with torch.autocast("cpu", dtype=dtype):
        loss, grads = _loss_and_grads(small, batch)
    torch.testing.assert_close(loss, ref_loss, **BF16)
    _assert_kept_grads_close(small, pruner.last_origins, ref_grads, grads)


def _assert_kept_grads_close(small, origins, ref_grads, grads):
    checked = 0
    for name in grads:
        origin = origins.get(name)
        reference = ref_grads[origin.name if origin else name]
        if origin is not None and origin.rows is not None:
            reference = reference[origin.rows]
        if origin is not None and origin.cols is not None:
            reference = reference[:, origin.cols]
        scale = reference.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(grads[name] / scale, reference / scale, **BF16, msg=name)
        checked += 1
    assert checked == len(dict(small.named_parameters()))


def test_squeezed_model_in_bf16_weights_matches_the_fp32_masked_model(pruned_mlm):
    model, pruner = pruned_mlm
    small = pruner.squeeze().to(torch.bfloat16)
    batch = random_batch(seed=6)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    loss, grads = _loss_and_grads(small, batch)
    assert all(p.dtype == torch.bfloat16 for p in small.parameters())
    torch.testing.assert_close(loss, ref_loss, **BF16)
    _assert_kept_grads_close(small, pruner.last_origins, ref_grads, grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compact_export_trains_under_autocast_like_the_fp32_masked_model(pruned_mlm, dtype):
    """What the HF Trainer's --bf16 does to the compact model: forward and backward in autocast."""
    model, pruner = pruned_mlm
    compact = squeezed_model(pruner).train()
    reference = pruner.squeeze().train()  # fp32, exact against the masked model (test_squeeze)
    for m in (reference, compact):  # dropout off: the two models draw their masks differently
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    batch = random_batch(seed=7)
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    with torch.autocast("cpu", dtype=dtype):
        loss, grads = _loss_and_grads(compact, batch)
    torch.testing.assert_close(loss, ref_loss, **BF16)
    assert set(grads) == {n for n in ref_grads}
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(grad / scale, ref_grads[name] / scale, **BF16, msg=name)
