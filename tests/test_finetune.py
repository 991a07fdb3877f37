"""Fine-tuning pruned models on GLUE and SQuAD files (fixtures in the original formats), offline.

A tiny BERT is pre-trained a few steps with Variance Pruning to 50% and exported both ways; the
tokenizer is a WordPiece trained here on the fixture texts.
"""
import json
import math
import os
import re
import shutil
import string
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer,
                          BertTokenizer)

from helpers import run_ok, train
from models import tiny_model
from vp_dist import VPConfig
from vp_dist.downstream import GLUE_TASKS, load_glue, load_squad
from vp_dist.downstream.finetune import FinetuneConfig, finetune
from vp_dist.downstream.tasks import distillation_loss, normalize_task_name, prepare_task
from vp_dist.export import MASKS_FILE, export_masked, export_squeezed

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
GLUE_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
             "qnli": "QNLI", "rte": "RTE"}
TABLE1_METRICS = {"cola": ["matthews_correlation"], "sst2": ["accuracy"], "mrpc": ["f1", "accuracy"],
                  "stsb": ["spearman", "pearson"], "qqp": ["accuracy", "f1"], "mnli": ["accuracy"],
                  "qnli": ["accuracy"], "rte": ["accuracy"], "squad": ["exact_match", "f1"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def data_dir(task: str) -> Path:
    return FIXTURES / "squad" if task == "squad" else FIXTURES / "glue" / GLUE_DIRS[task]


def fixture_tokenizer() -> BertTokenizer:
    texts = []
    for task in GLUE_TASKS.values():
        for split in load_glue(task, data_dir(task.name)).values():
            for column in task.text_columns:
                texts.extend(split[column])
    for split in load_squad(data_dir("squad")).values():
        texts.extend(split["context"])
        texts.extend(split["question"])
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    return BertTokenizer(vocab=wordpiece.get_vocab())


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A 50%-pruned tiny pre-trained BERT: its masked and squeezed exports, and the masks."""
    root = tmp_path_factory.mktemp("exports")
    tokenizer = fixture_tokenizer()
    model = tiny_model("bert-pretraining", vocab_size=len(tokenizer), max_position_embeddings=512)
    pruner, _, _ = train(model, VPConfig(start=2, interval=2, increment=0.25, target=0.5), steps=4)
    export_masked(pruner, root / "masked", tokenizer)
    export_squeezed(pruner, root / "squeezed", tokenizer)
    return {"masked": root / "masked", "squeezed": root / "squeezed", "masks": pruner.masks()}


def run(tmp_path, model, task, **overrides) -> dict:
    values = dict(task=task, model=str(model), data_dir=str(data_dir(task)), output_dir=str(tmp_path / "out"),
                  max_steps=4, batch_size=2, lr=1e-3, warmup_ratio=0.0, max_seq_len=64, doc_stride=32)
    values.update(overrides)
    return finetune(FinetuneConfig(**values))


def layer_weight(model, name):
    return model.get_submodule(name).weight.detach()


def test_masked_model_fine_tunes_on_glue_with_pruned_rows_still_zero(exports, tmp_path):
    metrics = run(tmp_path, exports["masked"], "mrpc")
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["eval"] == metrics["eval"] and set(written["eval"]["validation"]) == {"f1", "accuracy"}
    assert written["model_kind"] == "masked" and written["train"]["steps"] == 4
    assert written["masks"] == {"pruned_rows": sum(int((~k).sum()) for k in exports["masks"].values()),
                                "total_rows": sum(k.numel() for k in exports["masks"].values()),
                                "pruned_rows_zero": True}
    before = AutoModelForSequenceClassification.from_pretrained(exports["masked"])
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    for name, kept in exports["masks"].items():
        assert torch.all(layer_weight(after, name)[~kept] == 0), name
        assert not torch.equal(layer_weight(after, name)[kept], layer_weight(before, name)[kept]), name
    assert load_file(str(tmp_path / "out" / "model" / MASKS_FILE)).keys() == exports["masks"].keys()


def test_without_the_masks_pruned_rows_would_move(exports, tmp_path):
    # The control for the test above: same run, masks file removed, so nothing holds the rows.
    unmasked = tmp_path / "unmasked"
    shutil.copytree(exports["masked"], unmasked)
    (unmasked / MASKS_FILE).unlink()
    metrics = run(tmp_path, unmasked, "mrpc")
    assert metrics["model_kind"] == "dense" and metrics["masks"] is None
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    moved = [name for name, kept in exports["masks"].items() if layer_weight(after, name)[~kept].abs().sum() > 0]
    assert len(moved) == len(exports["masks"])


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 evaluation script's normalisation."""
    text = "".join(char for char in text.lower() if char not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_scores_by_hand(model_dir: Path, max_seq_len: int = 64, doc_stride: int = 32,
                         max_answer_length: int = 30) -> tuple[dict[str, float], dict[str, str]]:
    """SQuAD v1.1 exact match and F1 (percent) of a saved model on the fixture's dev file, and its
    answers by question id, written out here from the definitions: every window of every question,
    the best-scoring valid context span (start + end logit) over all of them, token-overlap F1
    against the best gold answer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    exact, f1, answers = 0.0, 0.0, {}
    for article in json.loads((data_dir("squad") / "dev-v1.1.json").read_text())["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                windows = tokenizer(qa["question"], context, truncation="only_second", max_length=max_seq_len,
                                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                                    padding="max_length", return_tensors="pt")
                with torch.no_grad():
                    out = model(**{key: windows[key] for key in ("input_ids", "attention_mask", "token_type_ids")})
                best_score, answer = -math.inf, ""
                for window in range(len(windows["input_ids"])):
                    in_context = [i for i, sequence in enumerate(windows.sequence_ids(window)) if sequence == 1]
                    for start in in_context:
                        for end in in_context:
                            if start <= end < start + max_answer_length:
                                score = float(out.start_logits[window, start] + out.end_logits[window, end])
                                if score > best_score:
                                    offsets = windows["offset_mapping"][window]
                                    best_score, answer = score, context[int(offsets[start][0]):int(offsets[end][1])]
                golds = [gold["text"] for gold in qa["answers"]]
                exact += max(float(normalize_answer(answer) == normalize_answer(gold)) for gold in golds)
                f1 += max(token_f1(answer, gold) for gold in golds)
                answers[qa["id"]] = answer
    return {"exact_match": 100 * exact / len(answers), "f1": 100 * f1 / len(answers)}, answers


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def test_squeezed_model_fine_tunes_on_squad_and_stays_squeezed(exports, tmp_path):
    metrics = run(tmp_path, exports["squeezed"], "squad")
    assert metrics["model_kind"] == "squeezed" and metrics["masks"] is None
    assert set(metrics["eval"]["validation"]) == {"exact_match", "f1"}
    scores, answers = squad_scores_by_hand(tmp_path / "out" / "model")
    assert metrics["eval"]["validation"] == pytest.approx(scores, abs=1e-6)
    from vp_dist.downstream.squad import postprocess_qa_predictions
    from vp_dist.downstream.tasks import predict
    task = prepare_task("squad", AutoTokenizer.from_pretrained(tmp_path / "out" / "model"), data_dir("squad"),
                        max_seq_len=64, doc_stride=32, splits="eval")
    dev = task.evals["validation"]
    logits = predict(AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out" / "model"), dev.features,
                     task.model_inputs, batch_size=8)
    assert postprocess_qa_predictions(dev.examples, dev.features, logits["start_logits"],
                                      logits["end_logits"]) == answers  # the same answers, not only the same score
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["model_type"] == "vp_bert" and saved["vp_kept_rows"]
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out" / "model")
    assert type(reloaded).__name__ == "VPBertForQuestionAnswering"


@pytest.mark.parametrize("task", [*GLUE_DIRS, "squad"])
def test_every_task_reports_the_paper_table1_metrics(exports, tmp_path, task):
    metrics = run(tmp_path, exports["masked"], task, max_steps=1, save_model=False)
    expected_splits = ["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"]
    assert list(metrics["eval"]) == expected_splits
    for split in expected_splits:
        assert list(metrics["eval"][split]) == TABLE1_METRICS[task]
    assert metrics["headline_metric"] == ("f1" if task == "squad" else TABLE1_METRICS[task][0])
    assert metrics["masks"]["pruned_rows_zero"] is True


def test_distillation_loss_is_zero_against_itself_and_scaled_by_t_squared(exports):
    task = prepare_task("mnli", fixture_tokenizer(), data_dir("mnli"), max_seq_len=32)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    assert distillation_loss(task, Out(student), Out(student), 2.0) == pytest.approx(0.0, abs=1e-6)
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / 4, -1), torch.softmax(teacher / 4, -1),
                                    reduction="batchmean")
    assert distillation_loss(task, Out(student), Out(teacher), 4.0) == pytest.approx(16 * float(kl), rel=1e-5)


def dense_pretrained(root: Path) -> Path:
    """A tiny BERT that was never pruned (no masks), saved as a pre-training checkpoint."""
    tokenizer = fixture_tokenizer()
    model = tiny_model("bert-pretraining", seed=3, vocab_size=len(tokenizer), max_position_embeddings=512)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def without_dropout(model_dir: Path) -> Path:
    """Dropout off in a saved model's config, so that a training step is a function of the weights."""
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=None)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


class GradientRecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradients it was asked to step with (after clipping), in group order."""
    steps: list = []

    def step(self, closure=None):
        type(self).steps.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def first_step_gradients_by_hand(student_dir: Path, teacher_dir: Path | None, alpha: float, temperature: float,
                                 batch_size: int, seed: int, max_grad_norm: float) -> list[torch.Tensor]:
    """The gradients `finetune` must step with at its first step, computed here from the loss's
    definition: (1 - alpha) CE + alpha T^2 KL(softmax(teacher / T) || softmax(student / T)),
    the KL averaged over the batch, the total gradient norm clipped to max_grad_norm."""
    from torch.utils.data import DataLoader, RandomSampler

    from vp_dist.downstream.finetune import _parameter_groups
    from vp_dist.downstream.tasks import load_task_model

    task = prepare_task("sst2", AutoTokenizer.from_pretrained(student_dir), data_dir("sst2"), max_seq_len=64)
    columns = task.train.select_columns([*task.model_inputs, "labels"]).with_format("torch")
    sampler = RandomSampler(columns, generator=torch.Generator().manual_seed(seed))  # finetune's batch order
    batch = next(iter(DataLoader(columns, batch_size=batch_size, sampler=sampler)))
    inputs = {key: batch[key] for key in task.model_inputs}
    student = load_task_model(task, str(student_dir)).train()
    logits = student(**inputs).logits.float()
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    if teacher_dir is not None:
        teacher = load_task_model(task, str(teacher_dir)).eval()
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits.float()
        q = torch.softmax(teacher_logits / temperature, -1)
        log_p = torch.log_softmax(logits / temperature, -1)
        kl = (q * (q.log() - log_p)).sum(-1).mean()
        loss = (1 - alpha) * loss + alpha * temperature ** 2 * kl
    loss.backward()
    params = [p for group in _parameter_groups(student, 0.0) for p in group["params"]]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    scale = min(1.0, max_grad_norm / (float(norm) + 1e-6))
    return [p.grad * scale for p in params]


def test_distillation_from_a_fine_tuned_dense_teacher(exports, tmp_path, monkeypatch):
    """A dense (never pruned) model fine-tuned on SST-2 teaches the squeezed student: the student's
    first update is driven by (1 - alpha) CE + alpha T^2 KL, computed here by hand, and differs from
    the update without the teacher."""
    teacher = run(tmp_path / "teacher", dense_pretrained(tmp_path / "dense"), "sst2")
    assert teacher["model_kind"] == "dense" and teacher["masks"] is None
    teacher_dir = tmp_path / "teacher" / "out" / "model"
    run(tmp_path / "student", exports["squeezed"], "sst2", max_steps=1)  # a squeezed student with an SST-2 head
    student_dir = without_dropout(tmp_path / "student" / "out" / "model")

    monkeypatch.setattr(torch.optim, "AdamW", GradientRecordingAdamW)
    monkeypatch.setattr(GradientRecordingAdamW, "steps", [])
    settings = dict(max_steps=1, batch_size=2, save_model=False)
    metrics = run(tmp_path / "kd", student_dir, "sst2", teacher=str(teacher_dir), kd_alpha=0.7, kd_temperature=3.0,
                  **settings)
    run(tmp_path / "ce", student_dir, "sst2", **settings)
    with_kd, without_kd = GradientRecordingAdamW.steps
    assert metrics["model_kind"] == "squeezed"
    assert metrics["distillation"] == {"teacher": str(teacher_dir), "alpha": 0.7, "temperature": 3.0}

    common = dict(batch_size=2, seed=42, max_grad_norm=1.0)  # FinetuneConfig's seed and clipping
    for recorded, expected in ((with_kd, first_step_gradients_by_hand(student_dir, teacher_dir, 0.7, 3.0, **common)),
                               (without_kd, first_step_gradients_by_hand(student_dir, None, 0.7, 3.0, **common))):
        assert [g.shape for g in recorded] == [g.shape for g in expected]
        for index, (got, want) in enumerate(zip(recorded, expected)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=f"parameter {index}")
    assert max(float((a - b).abs().max()) for a, b in zip(with_kd, without_kd)) > 1e-3  # the teacher mattered

    with pytest.raises(ValueError, match="fine-tuned on sst2"):  # a pre-training checkpoint has no task head
        run(tmp_path, exports["squeezed"], "sst2", teacher=str(exports["masked"]))
    with pytest.raises(ValueError, match="has a head of 2 labels, task mnli needs 3"):  # fine-tuned on another task
        run(tmp_path, exports["squeezed"], "mnli", teacher=str(teacher_dir))


def test_masks_that_do_not_fit_the_weights_are_refused(exports, tmp_path):
    wrong = {name: ~kept for name, kept in exports["masks"].items()}
    from safetensors.torch import save_file
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="not zero in the model"):
        run(tmp_path, exports["masked"], "rte", masks=str(tmp_path / "wrong.safetensors"))


def test_task_names_accept_glue_spellings():
    assert [normalize_task_name(t) for t in ("SST-2", "STS-B", "CoLA", "SQuAD", "squad_v1.1")] == \
        ["sst2", "stsb", "cola", "squad", "squad"]


def test_deepspeed_single_process_keeps_pruned_rows_zero(exports, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, str(REPO / "launch" / "finetune.py"), "--task", "qnli", "--model",
               str(exports["masked"]), "--data_dir", str(data_dir("qnli")), "--output_dir", str(tmp_path / "ds"),
               "--max_steps", "3", "--batch_size", "2", "--lr", "1e-3", "--max_seq_len", "64",
               "--deepspeed_config", str(REPO / "ds_configs" / "zero2_cpu.json")]
    run_ok(command, env=env, cwd=tmp_path, timeout=300)
    metrics = json.loads((tmp_path / "ds" / "metrics.json").read_text())
    assert metrics["deepspeed"] is True and metrics["world_size"] == 1 and metrics["train"]["steps"] == 3
    assert metrics["masks"]["pruned_rows_zero"] is True
    before = AutoModelForSequenceClassification.from_pretrained(exports["masked"])
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ds" / "model")
    for name, kept in exports["masks"].items():
        assert torch.all(layer_weight(after, name)[~kept] == 0), name
        assert not torch.equal(layer_weight(after, name)[kept], layer_weight(before, name)[kept]), name


@pytest.mark.slow
def test_two_ranks_zero3_fine_tune_and_evaluate_like_one_process(exports, tmp_path):
    # MNLI dev files of 2 and 3 rows: shares padded across 2 ranks, gathered back in order.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun binds a free port itself (no window in which another process can take it)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch" / "finetune.py"), "--task", "mnli", "--model", str(exports["masked"]),
               "--data_dir", str(data_dir("mnli")), "--output_dir", str(tmp_path / "ds"), "--max_steps", "3",
               "--batch_size", "1", "--lr", "1e-3", "--max_seq_len", "64",
               "--deepspeed_config", str(REPO / "ds_configs" / "zero3_cpu.json")]
    run_ok(command, env=env, cwd=tmp_path, timeout=600)
    metrics = json.loads((tmp_path / "ds" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["masks"]["pruned_rows_zero"] is True
    from vp_dist.downstream.tasks import evaluate, load_task_model
    task = prepare_task("mnli", fixture_tokenizer(), data_dir("mnli"), max_seq_len=64, splits="eval")
    single = evaluate(load_task_model(task, str(tmp_path / "ds" / "model")), task)
    assert single.keys() == metrics["eval"].keys()
    for split, scores in single.items():
        assert scores == pytest.approx(metrics["eval"][split]), split
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ds" / "model")
    for name, kept in exports["masks"].items():
        assert torch.all(layer_weight(after, name)[~kept] == 0), name


@pytest.mark.slow
def test_bench_finetune_reports_both_models_and_smaller_squeezed_state(tmp_path):
    command = [sys.executable, str(REPO / "launch" / "bench_finetune.py"), "--shape", "tiny", "--seq", "32",
               "--batches", "1,2", "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu",
               "--head-widths", "grouped"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = run_ok(command, env=env, cwd=tmp_path, timeout=600)
    result = json.loads(done.stdout)
    assert result["seq"] == 32 and [row["batch"] for row in result["rows"]] == [1, 2]
    assert result["head_widths"] == "grouped"
    for row in result["rows"]:
        dense, squeezed = row["dense"], row["squeezed"]
        assert dense["it_per_s"] > 0 and squeezed["it_per_s"] > 0
        assert squeezed["parameters"] < dense["parameters"] and squeezed["state_bytes"] < dense["state_bytes"]
        # AdamW fp32: parameters, gradients, two moments (and a step counter per tensor)
        assert dense["state_bytes"] == pytest.approx(16 * dense["parameters"], rel=1e-3)



def test_pad_ffn_fine_tunes_a_squeezed_model_as_the_unpadded_one_and_saves_it_unpadded(exports, tmp_path, caplog):
    """`pad_ffn=8`: the squeezed model's FFN inner widths padded with zero units for training
    (exact): the same loss curve, metrics and fine-tuned weights as without, saved unpadded. The
    padded run also asks for `head_widths="grouped"` (heads of 8 form one group: the blocks are
    kept, which the log says; `tests/test_squeeze_attention.py` rebuilds into groups)."""
    from safetensors.torch import load_file as load_weights
    from vp_dist.squeeze import inner_padding
    config = json.loads((exports["squeezed"] / "config.json").read_text())
    widths = [k for name, k in config["vp_kept_rows"].items() if name.endswith("intermediate.dense")]
    assert any(k % 8 for k in widths), widths  # an unaligned FFN width to pad
    with caplog.at_level("INFO", logger="vp_dist.downstream.finetune"):
        runs = {pad: run(tmp_path / f"pad{pad}", exports["squeezed"], "sst2", pad_ffn=pad, max_steps=3,
                         head_widths="grouped" if pad == 8 else None)
                for pad in (1, 8)}
    assert any("attention head layout 'grouped': 0 shrunk blocks rebuilt" in r.getMessage() for r in caplog.records)
    added = [int(m.group(1)) for m in (re.search(r"multiples of 8: (\d+) zero units", r.getMessage())
                                       for r in caplog.records) if m]
    assert added and added[0] > 0, "the padded run must have trained on padded widths"
    for key in ("first_loss", "final_loss"):
        assert runs[8]["train"][key] == pytest.approx(runs[1]["train"][key], rel=1e-5)
    assert runs[8]["config"]["pad_ffn"] == 8
    assert runs[8]["eval"]["validation"] == pytest.approx(runs[1]["eval"]["validation"], abs=1e-6)
    plain, padded = (load_weights(str(tmp_path / f"pad{pad}" / "out" / "model" / "model.safetensors"))
                     for pad in (1, 8))
    assert plain.keys() == padded.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(padded[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pad8" / "out" / "model")
    assert not any(inner_padding(module) for module in reloaded.modules())


def test_head_widths_of_fine_tuning_is_validated():
    with pytest.raises(ValueError, match="head_widths='wide' must be"):
        FinetuneConfig(task="sst2", model="m", output_dir="o", head_widths="wide")
