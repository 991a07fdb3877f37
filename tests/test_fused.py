"""apex is used only where importable; the PyTorch fallback changes nothing."""
import pytest
import torch
import torch.nn as nn

from models import random_batch, tiny_model
from vp_dist.train.fused import apex_fused_layer_norm, fuse_layer_norms


class ReferenceLayerNorm(nn.LayerNorm):
    """Stands in for apex's FusedLayerNorm (same constructor and state), to test the swap itself."""


def test_auto_without_apex_or_gpu_keeps_torch_layer_norms():
    model = tiny_model("bert-mlm")
    if apex_fused_layer_norm() is not None and torch.cuda.is_available():
        pytest.skip("apex and a GPU are present: the fallback path is not taken here")
    layer_norms = [name for name, m in model.named_modules() if type(m) is nn.LayerNorm]
    assert fuse_layer_norms(model, "auto") == 0
    assert layer_norms and layer_norms == [name for name, m in model.named_modules() if type(m) is nn.LayerNorm]


def test_on_without_apex_fails_clearly():
    if apex_fused_layer_norm() is not None and torch.cuda.is_available():
        pytest.skip("apex and a GPU are present")
    with pytest.raises(RuntimeError, match="needs NVIDIA apex"):
        fuse_layer_norms(tiny_model("bert-mlm"), "on")


def test_swap_keeps_parameters_and_function():
    model = tiny_model("bert-mlm").eval()
    batch = random_batch()
    with torch.no_grad():
        before = model(**batch).logits
    count = sum(type(m) is nn.LayerNorm for m in model.modules())
    assert fuse_layer_norms(model, "auto", layer_norm_class=ReferenceLayerNorm) == count > 0
    assert sum(type(m) is ReferenceLayerNorm for m in model.modules()) == count
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="fused_layernorm='maybe'"):
        fuse_layer_norms(tiny_model("bert-mlm"), "maybe")
