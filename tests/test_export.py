"""SPEC 6: the masked export loads in stock transformers, the squeezed one through vp_dist's classes,
and both compute the pruned model's function."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining,
                          AutoModelForQuestionAnswering, AutoModelForSequenceClassification)

from helpers import run_ok, train
from models import random_batch, tiny_model
from vp_dist import SqueezedLinear, VPConfig
from vp_dist.export import MASKS_FILE, export_masked, export_squeezed

AUTO = {"bert-cls": AutoModelForSequenceClassification, "bert-qa": AutoModelForQuestionAnswering,
        "bert-mlm": AutoModelForMaskedLM, "bert-pretraining": AutoModelForPreTraining}
SCHEDULE = VPConfig(start=2, interval=2, increment=0.25, target=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def pruned(kind, **overrides):
    model = tiny_model(kind, **overrides)
    pruner, _, _ = train(model, SCHEDULE, steps=4)
    return model.eval(), pruner


def inputs(seed=1234):
    batch = random_batch(seed=seed)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def outputs(model, batch):
    with torch.no_grad():
        out = model.eval()(**batch)
    names = [n for n in ("logits", "start_logits", "end_logits", "prediction_logits", "seq_relationship_logits")
             if getattr(out, n, None) is not None]
    return {n: getattr(out, n) for n in names}


def assert_same_outputs(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", list(AUTO))
def test_masked_export_reloads_with_the_masked_models_outputs(kind, tmp_path):
    model, pruner = pruned(kind)
    batch = inputs()
    export_masked(pruner, tmp_path)
    loaded = AUTO[kind].from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(model).__name__  # the stock class, full size
    assert_same_outputs(outputs(loaded, batch), outputs(model, batch))


@pytest.mark.parametrize("kind", list(AUTO))
def test_squeezed_export_reloads_smaller_with_the_same_outputs(kind, tmp_path):
    model, pruner = pruned(kind)
    batch = inputs()
    export_squeezed(pruner, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vp_bert"
    loaded = AUTO[kind].from_pretrained(tmp_path)
    assert type(loaded).__name__ == "VP" + type(model).__name__
    assert any(isinstance(m, SqueezedLinear) for m in loaded.modules())
    assert not any(isinstance(m, SqueezedLinear) for m in model.modules())  # the pruner's model trains on
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    assert_same_outputs(outputs(loaded, batch), outputs(model, batch))


def test_both_exports_save_the_pruners_masks(tmp_path):
    model, pruner = pruned("bert-cls")
    for export in (export_masked, export_squeezed):
        export(pruner, tmp_path / export.__name__)
        saved = load_file(str(tmp_path / export.__name__ / MASKS_FILE))
        assert saved.keys() == pruner.masks().keys()
        for name, kept in pruner.masks().items():
            assert torch.equal(saved[name], kept), (export.__name__, name)
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export_masked")
    for name, kept in pruner.masks().items():
        weight = stock.get_submodule(name).weight
        assert torch.all(weight[~kept] == 0) and torch.all(weight[kept].abs().sum(1) > 0), name


def test_pretraining_checkpoint_loads_into_task_heads_encoder_kept_head_new(tmp_path):
    model, pruner = pruned("bert-pretraining")
    export_squeezed(pruner, tmp_path)
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder).__name__ == "VPBertModel"
    for auto in (AutoModelForSequenceClassification, AutoModelForQuestionAnswering):
        task_model = auto.from_pretrained(tmp_path, num_labels=2)
        for name, tensor in encoder.state_dict().items():
            if not name.startswith("pooler"):
                torch.testing.assert_close(task_model.bert.state_dict()[name], tensor, msg=name)
        head = task_model.classifier if hasattr(task_model, "classifier") else task_model.qa_outputs
        assert torch.isfinite(head.weight).all() and head.weight.abs().sum() > 0  # newly initialised


def test_masked_export_of_a_squeezed_model_loads_in_stock_transformers_without_vp_dist(tmp_path):
    model, pruner = pruned("bert-cls")
    squeezed = pruner.squeeze().eval()
    batch = inputs(seed=99)
    expected = outputs(squeezed, batch)["logits"]
    export_masked(squeezed, tmp_path / "model")
    torch.save(batch, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'model')!r}).eval()
        with torch.no_grad():
            logits = model(**torch.load({str(tmp_path / 'batch.pt')!r})).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        assert type(model).__name__ == "BertForSequenceClassification", type(model)
        assert not any(name.split(".")[0] == "vp_dist" for name in sys.modules), "vp_dist was imported"
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def test_folded_ffn_expands_exactly_when_the_activation_of_zero_is_not_zero(tmp_path):
    # sigmoid(0) = 0.5: re-inserted zero FFN-in rows must still contribute nothing to FFN-out.
    model, pruner = pruned("bert-cls", hidden_act="sigmoid")
    squeezed = pruner.squeeze().eval()
    batch = inputs()
    export_masked(squeezed, tmp_path)
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert_same_outputs(outputs(stock, batch), outputs(model, batch))


def test_reexports_of_a_loaded_squeezed_model_round_trip(tmp_path):
    model, pruner = pruned("bert-qa")
    batch = inputs()
    export_squeezed(pruner, tmp_path / "a")
    loaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "a")
    export_squeezed(loaded, tmp_path / "b")
    export_masked(loaded, tmp_path / "c")
    assert (json.loads((tmp_path / "a" / "config.json").read_text())["vp_kept_rows"]
            == json.loads((tmp_path / "b" / "config.json").read_text())["vp_kept_rows"])
    for directory in ("b", "c"):
        again = AutoModelForQuestionAnswering.from_pretrained(tmp_path / directory)
        assert_same_outputs(outputs(again, batch), outputs(model, batch))
    # the folded FFN-in positions survive the trip: masks of the masked re-export are the pruner's
    saved = load_file(str(tmp_path / "c" / MASKS_FILE))
    for name, kept in pruner.masks().items():
        assert torch.equal(saved[name], kept), name


def test_exports_refuse_models_that_are_not_bert(tmp_path):
    model, pruner = pruned("llama")
    with pytest.raises(ValueError, match="BERT"):
        export_masked(pruner, tmp_path / "m")
    with pytest.raises(ValueError, match="BERT"):
        export_squeezed(pruner, tmp_path / "s")


def test_import_vp_dist_is_enough_for_auto_classes_and_stays_light(tmp_path):
    model, pruner = pruned("bert-cls")
    export_squeezed(pruner, tmp_path / "model")
    script = textwrap.dedent(f"""
        import sys
        import vp_dist
        assert "vp_dist.export.modeling" not in sys.modules  # model classes load on first use
        assert "transformers.models.bert.modeling_bert" not in sys.modules
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'model')!r})
        assert type(model).__name__ == "VPBertForSequenceClassification", type(model)
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo})


@pytest.mark.slow
@pytest.mark.parametrize("stage,head_widths", [(2, "split"), (3, "split"), (3, "grouped")])
def test_exports_from_a_deepspeed_engine_mid_schedule_and_after_re_partition(tmp_path, stage, head_widths):
    """The worker (this file run as a script) trains under ZeRO, exports at a masked step and
    after the squeeze rebuilt the engine, and records the engine's own logits each time.
    `grouped`: `VPConfig(head_widths="grouped")` on heads of 16, so that the rebuilt engine's shrunk
    blocks hold head groups, and the compact export records and reloads them."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run_ok([sys.executable, os.path.abspath(__file__), str(tmp_path), str(stage), head_widths], env=env,
           cwd=tmp_path, timeout=600)
    expected = torch.load(tmp_path / "expected.pt")
    groups = expected.pop("groups")
    assert groups and (max(map(len, groups)) > 1) == (head_widths == "grouped"), groups
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "end_squeezed")
    assert [m.groups for m in loaded.modules() if hasattr(m, "widths_record")] == groups
    batch = inputs(seed=99)
    for moment in ("mid", "end"):
        for kind, auto_name in (("masked", "BertForSequenceClassification"),
                                ("squeezed", "VPBertForSequenceClassification")):
            loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"{moment}_{kind}")
            assert type(loaded).__name__ == auto_name
            torch.testing.assert_close(outputs(loaded, batch)["logits"], expected[moment], rtol=1e-5, atol=1e-5,
                                       msg=f"{moment} {kind}")


def _engine_export_worker(out_dir: str, stage: int, head_widths: str) -> None:
    import deepspeed
    from transformers import BertForSequenceClassification

    from models import tiny_bert_config
    from vp_dist import VariancePruner, prepare_model
    from vp_dist.train.distributed_env import init_distributed

    from vp_dist.squeeze import attention
    init_distributed()
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "num_attention_heads": 4} if head_widths == "grouped" else {}
    attention.MIN_GROUP_SAVING = 0.0  # this process only: any saving makes a group
    model = prepare_model(BertForSequenceClassification(tiny_bert_config(num_labels=3, **shape)))
    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    pruner = VariancePruner(engine, VPConfig(start=2, interval=2, increment=0.25, target=0.5,
                                             squeeze_at_target=True, head_widths=head_widths))
    probe = inputs(seed=99)

    def engine_logits():
        engine.eval()
        with torch.no_grad():
            value = engine(**probe).logits.float().cpu()
        engine.train()
        return value

    expected = {}
    for step in range(4):
        batch = random_batch(seed=step)
        with pruner.observe(batch["attention_mask"]):
            loss = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=torch.arange(3) % 3).loss
        engine.backward(loss)
        engine.step()
        pruner.step()
        engine = pruner.engine
        if step == 1:  # pruned to 25%, still masked in the engine
            expected["mid"] = engine_logits()
            export_masked(pruner, f"{out_dir}/mid_masked")
            export_squeezed(pruner, f"{out_dir}/mid_squeezed")
    assert pruner.squeezed
    expected["end"] = engine_logits()
    export_masked(pruner, f"{out_dir}/end_masked")
    export_squeezed(pruner, f"{out_dir}/end_squeezed")
    expected["groups"] = [m.groups for m in engine.module.modules() if isinstance(m, attention.SqueezedBertAttention)]
    torch.save(expected, f"{out_dir}/expected.pt")


if __name__ == "__main__":  # run as a script, tests/ is first on sys.path
    _engine_export_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])

