"""The compact export loads anywhere transformers does: remote code in the folder, ONNX.

Each loader runs in a fresh interpreter with a clean PYTHONPATH, another working directory and
`vp_dist` blocked from importing (`sys.modules["vp_dist"] = None`), so a hidden dependency on the
package fails the test instead of passing silently.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import train
from models import tiny_model
from vp_dist import SqueezedLinear, VPConfig
from vp_dist.export import SELF_CONTAINED_MODULES, export_masked, export_squeezed
from vp_dist.export.remote_code import _rewrite, flat_name

SCHEDULE = VPConfig(start=2, interval=2, increment=0.25, target=0.5)
NO_VP_DIST = textwrap.dedent("""\
    import sys
    sys.modules["vp_dist"] = None  # any import of vp_dist now raises ImportError
    import json, torch
    """)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def exports(kind, tmp_path, **overrides):
    model = tiny_model(kind, **overrides)
    pruner, _, _ = train(model, SCHEDULE, steps=4)
    squeezed, masked = tmp_path / "export_squeezed", tmp_path / "export_masked"
    export_squeezed(pruner, squeezed)
    export_masked(pruner, masked)
    return squeezed, masked


def run_without_vp_dist(code: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", NO_VP_DIST + textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOAD_AND_COMPARE = """
    import transformers
    from transformers import {auto}
    squeezed = {auto}.from_pretrained({squeezed!r}, trust_remote_code=True).eval()
    masked = getattr(transformers, {stock!r}).from_pretrained({masked!r}).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        a, b = squeezed(input_ids=ids, attention_mask=mask), masked(input_ids=ids, attention_mask=mask)
    names = [n for n in ("logits", "start_logits", "end_logits") if getattr(a, n, None) is not None]
    assert not [m for m in sys.modules if m.startswith("vp_dist") and sys.modules[m] is not None]
    print(json.dumps({{"class": type(squeezed).__module__ + "." + type(squeezed).__name__,
                      "parameters": [sum(p.numel() for p in m.parameters()) for m in (squeezed, masked)],
                      "max_diff": max(float((getattr(a, n) - getattr(b, n)).abs().max()) for n in names),
                      "scale": max(float(getattr(b, n).abs().max()) for n in names)}}))
"""


@pytest.mark.parametrize("kind, auto, stock", [
    ("bert-cls", "AutoModelForSequenceClassification", "BertForSequenceClassification"),
    ("bert-qa", "AutoModelForQuestionAnswering", "BertForQuestionAnswering"),
])
def test_squeezed_export_loads_with_remote_code_and_no_vp_dist(kind, auto, stock, tmp_path):
    squeezed, masked = exports(kind, tmp_path)
    config = json.loads((squeezed / "config.json").read_text())
    assert config["auto_map"][auto] == f"{flat_name('vp_dist.export.modeling')}.VP{stock}"
    assert config["auto_map"]["AutoConfig"] == f"{flat_name('vp_dist.export.config')}.VPBertConfig"
    assert all((squeezed / f"{flat_name(module)}.py").is_file() for module in SELF_CONTAINED_MODULES)
    result = run_without_vp_dist(LOAD_AND_COMPARE.format(auto=auto, stock=stock, squeezed=str(squeezed),
                                                         masked=str(masked)), tmp_path)
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(f"VP{stock}")
    squeezed_params, full_params = result["parameters"]
    assert squeezed_params < 0.9 * full_params  # the compact model, not a full-size one
    assert result["max_diff"] <= 1e-5 * max(1.0, result["scale"]), result


def test_a_bundled_module_importing_an_unlisted_vp_dist_module_is_refused():
    source = "from ..distributed import zero\nfrom ..squeeze import SqueezedLinear\n"
    with pytest.raises(ValueError, match=r"vp_dist.distributed.*not in SELF_CONTAINED_MODULES"):
        _rewrite("vp_dist.export.structure", source, {"vp_dist.export.structure", "vp_dist.squeeze"})


def test_imports_between_bundled_modules_become_same_folder_imports():
    source = ("from .. import adapters\nfrom ..squeeze import SqueezedLinear\n"
              "def f():\n    from .config import VPBertConfig\n    return VPBertConfig\n")
    rewritten = _rewrite("vp_dist.export.structure", source,
                         {"vp_dist.adapters", "vp_dist.squeeze", "vp_dist.export.config"})
    assert rewritten.splitlines() == [
        "from .adapters import __name__ as _adapters_module_name  # noqa: F401 (bundled file)",
        "from . import adapters as adapters",
        "from .squeeze import SqueezedLinear",
        "def f():",
        "    from .export_config import VPBertConfig",
        "    return VPBertConfig"]


def test_squeezed_linear_export_form_is_bitwise_the_training_form():
    torch.manual_seed(0)
    kept = torch.tensor([0, 3, 4, 9])
    layer = SqueezedLinear(torch.randn(4, 6), torch.randn(10), kept)
    x = torch.randn(2, 5, 6)
    products = torch.nn.functional.linear(x, layer.weight)  # the kept rows' products, no bias
    assert torch.equal(layer._gathered(products), layer(x))


def test_squeezed_linear_runs_in_onnxruntime_with_other_shapes(tmp_path):
    """The layer alone, through the TorchScript exporter, whose index_add export had fixed shapes."""
    import onnxruntime

    torch.manual_seed(0)
    layer = SqueezedLinear(torch.randn(4, 6), torch.randn(10), torch.tensor([0, 3, 4, 9])).eval()
    path = tmp_path / "layer.onnx"
    torch.onnx.export(layer, (torch.randn(2, 5, 6),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamic_axes={"x": {0: "batch", 1: "seq"}}, dynamo=False)
    x = torch.randn(3, 8, 6)
    (y,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), layer(x).detach(), rtol=1e-6, atol=1e-6)


ONNX_EXPORT = """
    import onnxruntime, transformers
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained({squeezed!r}, trust_remote_code=True).eval()

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 10))
    dims = {{0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), "model.onnx", input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], opset_version=17, dynamo=True,
                      dynamic_shapes={{"input_ids": dims, "attention_mask": dims}})
    import onnx
    opset = max(o.version for o in onnx.load("model.onnx").opset_import if o.domain in ("", "ai.onnx"))
    masked = transformers.BertForSequenceClassification.from_pretrained({masked!r}).eval()
    ids = torch.randint(0, 30, (3, 7))  # another batch and sequence length than the export's
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    (onnx_logits,) = onnxruntime.InferenceSession("model.onnx").run(
        None, {{"input_ids": ids.numpy(), "attention_mask": mask.numpy()}})
    with torch.no_grad():
        reference = masked(input_ids=ids, attention_mask=mask).logits
    print(json.dumps({{"opset": opset, "max_diff": float((torch.from_numpy(onnx_logits) - reference).abs().max()),
                      "scale": float(reference.abs().max())}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [32, 64])
def test_squeezed_export_runs_in_onnxruntime_with_the_masked_exports_logits(hidden, tmp_path):
    squeezed, masked = exports("bert-cls", tmp_path, hidden_size=hidden)
    widths = [block["widths"] for block in json.loads((squeezed / "config.json").read_text())["vp_attention"].values()]
    if hidden == 64:  # heads of 16: score width 8, value width 16 (the eval forward pads q, k for SDPA)
        assert widths and all(e < ev for e, ev in widths), widths
    result = run_without_vp_dist(ONNX_EXPORT.format(squeezed=str(squeezed), masked=str(masked)), tmp_path)
    assert result["opset"] >= 17
    assert result["max_diff"] <= 1e-5 * max(1.0, result["scale"]), result
