"""apex is used only where importable; the PyTorch fallback changes nothing.

The swap is checked twice: with a stand-in class everywhere (the swap itself), and with apex's real
`FusedLayerNorm` where apex and a GPU are present (the Docker image); the fallback tests run
exactly where the apex test cannot.
"""
import pytest
import torch
import torch.nn as nn

from models import random_batch, tiny_model
from vp_dist.train.fused import apex_fused_layer_norm, fuse_layer_norms

APEX_AND_GPU = apex_fused_layer_norm() is not None and torch.cuda.is_available()


class ReferenceLayerNorm(nn.LayerNorm):
    """Stands in for apex's FusedLayerNorm (same constructor and state), to test the swap itself."""


def model_with_trained_layer_norms() -> nn.Module:
    """A tiny BERT whose LayerNorms are far from their initial weight 1, bias 0 (and all differ),
    so a swap that dropped the state would change the output."""
    model = tiny_model("bert-mlm").eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.LayerNorm:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model


def layer_norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().cpu().clone() for name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) or type(module).__name__ == "FusedLayerNorm"
            for key, value in module.state_dict().items()}


def assert_swap_keeps_parameters_and_function(model: nn.Module, fused_class, device: str, **swap) -> None:
    batch = {key: value.to(device) for key, value in random_batch().items()}
    before_state = layer_norm_state(model)
    with torch.no_grad():
        before = model.to(device)(**batch).logits
    model.cpu()
    count = sum(type(m) is nn.LayerNorm for m in model.modules())
    assert fuse_layer_norms(model, "auto", **swap) == count > 0
    assert sum(type(m) is fused_class for m in model.modules()) == count
    assert not any(type(m) is nn.LayerNorm for m in model.modules())
    after_state = layer_norm_state(model)
    assert after_state.keys() == before_state.keys()
    for key, value in before_state.items():
        torch.testing.assert_close(after_state[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(model.to(device)(**batch).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(APEX_AND_GPU, reason="apex and a GPU are present: the fallback path is not taken here")
def test_auto_without_apex_or_gpu_keeps_torch_layer_norms():
    model = tiny_model("bert-mlm")
    layer_norms = [name for name, m in model.named_modules() if type(m) is nn.LayerNorm]
    assert fuse_layer_norms(model, "auto") == 0
    assert layer_norms and layer_norms == [name for name, m in model.named_modules() if type(m) is nn.LayerNorm]


@pytest.mark.skipif(APEX_AND_GPU, reason="apex and a GPU are present: the fallback path is not taken here")
def test_on_without_apex_fails_clearly():
    with pytest.raises(RuntimeError, match="needs NVIDIA apex"):
        fuse_layer_norms(tiny_model("bert-mlm"), "on")


def test_swap_keeps_parameters_and_function():
    assert_swap_keeps_parameters_and_function(model_with_trained_layer_norms(), ReferenceLayerNorm, "cpu",
                                              layer_norm_class=ReferenceLayerNorm)


@pytest.mark.skipif(not APEX_AND_GPU, reason="needs NVIDIA apex with its CUDA extension and a GPU (the Docker image); "
                                             "the fallback tests above run instead")
def test_apex_swap_keeps_parameters_and_function_on_gpu():
    assert_swap_keeps_parameters_and_function(model_with_trained_layer_norms(), apex_fused_layer_norm(), "cuda")


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="fused_layernorm='maybe'"):
        fuse_layer_norms(tiny_model("bert-mlm"), "maybe")
