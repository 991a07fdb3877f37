"""Paper Fig. 2: without retraining, pruning the lowest-variance rows hurts a fine-tuned model less
than pruning random rows of the same count per layer."""
import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from vp_dist.downstream.finetune import FinetuneConfig, finetune
from vp_dist.downstream.posthoc import (PosthocConfig, RowPruning, collect_statistics, posthoc, random_selection,
                                        variance_selection)
from vp_dist.downstream.tasks import load_task_model, prepare_task

POSITIVE = [f"good{i}" for i in range(8)]
NEGATIVE = [f"bad{i}" for i in range(8)]
FILLER = [f"w{i}" for i in range(48)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def write_sentiment_task(directory, seed: int) -> None:
    """SST-2-format files: 6-10 filler words and one or two words of the label's polarity."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for split, count in (("train", 512), ("dev", 256)):
        lines = ["sentence\tlabel"]
        for _ in range(count):
            label = rng.randrange(2)
            words = [rng.choice(FILLER) for _ in range(rng.randint(6, 10))]
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
            lines.append(f"{' '.join(words)}\t{label}")
        (directory / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def word_tokenizer() -> BertTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A tiny BERT fine-tuned to 100% on the synthetic task, and the task's data directory."""
    root = tmp_path_factory.mktemp("posthoc")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    write_sentiment_task(root / "data", seed=3)
    tokenizer = word_tokenizer()
    torch.manual_seed(3)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, num_labels=2))
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    metrics = finetune(FinetuneConfig(task="sst2", model=str(root / "init"), data_dir=str(root / "data"),
                                      output_dir=str(root / "ft"), max_steps=60, batch_size=32, lr=2e-3,
                                      max_seq_len=16, seed=3))
    torch.set_num_threads(previous)
    assert metrics["eval"]["validation"]["accuracy"] > 95
    return root


def test_variance_pruning_stays_above_random_rows_over_the_sweep(fine_tuned, tmp_path):
    result = posthoc(PosthocConfig(task="sst2", model=str(fine_tuned / "ft" / "model"),
                                   data_dir=str(fine_tuned / "data"), output_dir=str(tmp_path), random_seeds=3,
                                   max_seq_len=16, seed=3))
    variance, random_mean = np.asarray(result["variance"]), np.asarray(result["random_mean"])
    assert result["sparsity"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert variance[0] == random_mean[0] > 95  # nothing pruned: the fine-tuned model itself
    assert variance.mean() > random_mean.mean() + 3.0, (variance, random_mean)
    assert variance[-1] < 75  # at 90% both are near chance: the sweep does reach the breakdown
    assert result["rows_pruned"] == sorted(result["rows_pruned"]) and result["rows_pruned"][0] == 0
    written = json.loads((tmp_path / "posthoc.json").read_text())
    assert written["variance"] == result["variance"] and len(written["random_per_seed"][3]) == 3
    assert (tmp_path / "posthoc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_baseline_prunes_the_same_count_in_every_layer_and_masks_apply_the_window_mean(fine_tuned):
    tokenizer = word_tokenizer()
    task = prepare_task("sst2", tokenizer, str(fine_tuned / "data"), max_seq_len=16, max_train_samples=64,
                        max_eval_samples=8)
    model = load_task_model(task, str(fine_tuned / "ft" / "model")).eval()
    pruner = collect_statistics(model, task, batch_size=16, alpha=0.9)
    assert pruner.steps_done == 4  # one observation per batch
    kept = variance_selection(pruner, 0.5)
    for projection_type, rows in pruner.type_rows.items():  # VP's global per-type selection
        assert int((~kept[rows]).sum()) == round(0.5 * rows.numel()), projection_type
    draws = [random_selection(pruner, kept, torch.Generator().manual_seed(seed)) for seed in range(2)]
    assert not torch.equal(draws[0], draws[1])
    for draw in draws:
        for ours, theirs in zip(pruner.layout.split(kept), pruner.layout.split(draw)):
            assert int((~ours).sum()) == int((~theirs).sum())

    pruning = RowPruning(pruner)
    before = {layer.name: layer.module.weight.detach().clone() for layer in pruner.layers}
    pruning.apply(draws[0])
    mean = pruner.layout.split(pruner.meters.window_mean(pruner.row_layer))
    for layer, layer_kept, layer_mean in zip(pruner.layers, pruner.layout.split(draws[0]), mean):
        assert torch.all(layer.module.weight[~layer_kept] == 0)
        torch.testing.assert_close(layer.module.bias[~layer_kept], layer_mean[~layer_kept].float())
    pruning.restore()
    for layer in pruner.layers:
        assert torch.equal(layer.module.weight, before[layer.name])


def test_a_squeezed_model_is_refused(tmp_path):
    from helpers import train
    from models import tiny_bert_config
    from vp_dist import VPConfig
    from vp_dist.export import export_squeezed
    write_sentiment_task(tmp_path / "data", seed=0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))  # its vocabulary covers the words
    pruner, _, _ = train(model, VPConfig(start=2, interval=2, increment=0.25, target=0.5), steps=4)
    export_squeezed(pruner, tmp_path / "squeezed", word_tokenizer())
    with pytest.raises(ValueError, match="squeezed model"):
        posthoc(PosthocConfig(task="sst2", model=str(tmp_path / "squeezed"), data_dir=str(tmp_path / "data"),
                              output_dir=str(tmp_path / "out"), max_seq_len=16))


def test_command_line_takes_every_config_field():
    from vp_dist.downstream.cli import parse_config
    cfg = parse_config(PosthocConfig, "posthoc", ["--task", "mrpc", "--model", "m", "--output_dir", "o",
                                                  "--sparsities", "0,0.25,0.5", "--random_seeds", "5"])
    assert cfg.sparsities == (0.0, 0.25, 0.5) and cfg.random_seeds == 5 and cfg.data_dir is None
    with pytest.raises(SystemExit):  # sparsity 1.0 would prune everything: refused with the reason
        parse_config(PosthocConfig, "posthoc", ["--task", "mrpc", "--model", "m", "--output_dir", "o",
                                                "--sparsities", "0,1.0"])

