"""The paper's Fig. 2: prune a fine-tuned model with no retraining, by variance or at random.

1. Statistics: the fine-tuned model runs in eval mode over the task's training data inside
   `VariancePruner.observe`, one batch per observation (SPEC 1: window mean and EWMV per row).
2. For each sparsity s: the variance selection is VP's own (global per projection type, lowest
   EWMV first, SPEC 3); the random baseline prunes, in every layer, as many rows as the variance
   selection pruned there, chosen uniformly (one draw per seed). Both apply the pruner's mask rule
   (weight row zero, window mean into the bias, SPEC 4) to the model, which is then evaluated
   with the task metric and restored.

    result = posthoc(PosthocConfig(task="mrpc", model="runs/mrpc/model", data_dir="glue_data/MRPC",
                                   output_dir="runs/mrpc/posthoc"))
writes `posthoc.json` and `posthoc.png` (metric against sparsity, both curves).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vp_dist.config import VPConfig
from vp_dist.downstream import tasks
from vp_dist.pruner import VariancePruner
from vp_dist.selection import select_rows

logger = logging.getLogger(__name__)

NEVER = 2 ** 62  # a schedule whose first pruning never comes: the pruner only collects


@dataclass
class PosthocConfig:
    """sparsities: fractions of rows pruned per projection type (comma-separated, each in [0, 1)).
    A squeezed model has no pruned rows left to choose from: give a dense or masked one."""

    task: str  # GLUE task or "squad" the model was fine-tuned on
    model: str  # fine-tuned model with all its rows: dense, or masked (fine-tune a run's export_masked/)
    output_dir: str  # where posthoc.json and posthoc.png go
    data_dir: str | None = None  # local GLUE TSV / SQuAD JSON folder; None: the hub
    tokenizer: str | None = None  # tokenizer path or hub name; None: the model's
    sparsities: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    random_seeds: int = 3  # draws of the random baseline per sparsity (averaged)
    batch_size: int = 32  # batch for collecting statistics
    eval_batch_size: int = 64  # batch for evaluation
    max_stat_batches: int | None = None  # cap on training batches for the statistics; None: all
    max_seq_len: int | None = None  # tokens per example; None: 128 for GLUE, 384 for SQuAD
    doc_stride: int = 128  # SQuAD: overlap between windows of a long context
    max_train_samples: int | None = None  # use the first N training examples
    max_eval_samples: int | None = None  # use the first N evaluation examples
    alpha: float = 0.9  # EWMV weight of the newest step variance (SPEC 1, eq. 4)
    seed: int = 0  # seed of the random baseline
    device: str | None = None  # cpu | cuda | cuda:N; None: cuda if available
    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"PosthocConfig: {message}")
        need(len(self.sparsities) > 0, "sparsities: give at least one")
        bad = [s for s in self.sparsities if not 0.0 <= s < 1.0]
        need(not bad, f"sparsities {bad} must be in [0, 1)")
        need(self.random_seeds >= 1, f"random_seeds={self.random_seeds} must be >= 1")
        need(0 < self.alpha <= 1, f"alpha={self.alpha} must be in (0, 1]")
        need(self.max_stat_batches is None or self.max_stat_batches >= 1,
             f"max_stat_batches={self.max_stat_batches} must be >= 1 (unset: all)")
        tasks.check_task_config(self, need)


@torch.no_grad()
def collect_statistics(model, task: tasks.TaskData, batch_size: int, alpha: float,
                       max_batches: int | None = None) -> VariancePruner:
    """A pruner holding the window mean and EWMV of every prunable row over the training data."""
    from tqdm.auto import tqdm

    pruner = VariancePruner(model, VPConfig(start=NEVER, interval=1, increment=0.5, target=0.5, alpha=alpha))
    device = next(model.parameters()).device
    columns = task.train.select_columns(list(task.model_inputs)).with_format("torch")
    model.eval()
    batches = range(0, len(columns), batch_size)
    if max_batches is not None:
        batches = batches[:max_batches]
    for start in tqdm(batches, desc="statistics", leave=False):
        batch = {k: v.to(device) for k, v in columns[start:start + batch_size].items()}
        with pruner.observe(batch["attention_mask"]):
            model(**batch)
        pruner.step()
    return pruner


def variance_selection(pruner: VariancePruner, sparsity: float) -> torch.Tensor:
    """VP's kept mask at `sparsity` (flat over all rows), from the pruner's EWMV alone."""
    everything = torch.ones_like(pruner.kept)
    return select_rows(pruner.meters.ewmv, everything, pruner.type_rows, pruner.row_layer, sparsity)


def random_selection(pruner: VariancePruner, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A kept mask pruning, in every layer, as many rows as `like` does there, chosen uniformly."""
    kept = torch.ones_like(like)
    for offset, size, layer_kept in zip(pruner.layout.offsets, pruner.layout.sizes, pruner.layout.split(like)):
        count = int((~layer_kept).sum())
        if count:
            rows = torch.randperm(size, generator=generator)[:count]
            kept[offset + rows.to(kept.device)] = False
    return kept


class RowPruning:
    """Applies a kept mask to the model in place (zero row, window mean into the bias) and undoes it."""

    def __init__(self, pruner: VariancePruner):
        self.pruner = pruner
        self.window_mean = pruner.meters.window_mean(pruner.row_layer)
        self.saved = [(layer.module.weight.detach().clone(), layer.module.bias.detach().clone())
                      for layer in pruner.layers]

    @torch.no_grad()
    def apply(self, kept: torch.Tensor) -> None:
        self.restore()
        layout = self.pruner.layout
        for layer, layer_kept, mean in zip(self.pruner.layers, layout.split(kept), layout.split(self.window_mean)):
            pruned = ~layer_kept
            layer.module.weight[pruned] = 0
            layer.module.bias[pruned] = mean[pruned].to(layer.module.bias.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        for layer, (weight, bias) in zip(self.pruner.layers, self.saved):
            layer.module.weight.copy_(weight)
            layer.module.bias.copy_(bias)


def sweep(model, task: tasks.TaskData, pruner: VariancePruner, sparsities, random_seeds: int, seed: int,
          eval_batch_size: int) -> dict:
    """Headline metric (and all metrics) at each sparsity, for variance and random pruning."""
    pruning = RowPruning(pruner)
    result = {"sparsity": list(sparsities), "metric": task.headline_metric,
              "variance": [], "random_mean": [], "random_per_seed": [], "rows_pruned": [],
              "scores": {"variance": [], "random": []}}
    try:
        for sparsity in sparsities:
            kept = variance_selection(pruner, sparsity)
            pruning.apply(kept)
            scores = tasks.evaluate(model, task, eval_batch_size)
            result["variance"].append(tasks.headline(task, scores))
            result["scores"]["variance"].append(scores)
            per_seed, seed_scores = [], []
            for draw in range(random_seeds):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + draw * 7919 + int(sparsity * 1000))
                pruning.apply(random_selection(pruner, kept, generator))
                scores = tasks.evaluate(model, task, eval_batch_size)
                per_seed.append(tasks.headline(task, scores))
                seed_scores.append(scores)
            result["random_per_seed"].append(per_seed)
            result["random_mean"].append(float(np.mean(per_seed)))
            result["scores"]["random"].append(seed_scores)
            result["rows_pruned"].append(int((~kept).sum()))
            logger.info("sparsity %.2f: variance %.2f, random %.2f (%s %s)", sparsity, result["variance"][-1],
                        result["random_mean"][-1], task.headline_metric, task.name)
    finally:
        pruning.restore()
    return result


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsity = np.asarray(result["sparsity"])
    per_seed = np.asarray(result["random_per_seed"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sparsity, result["variance"], "o-", color="tab:green", label="variance pruning")
    ax.plot(sparsity, result["random_mean"], "s--", color="tab:gray", label=f"random rows ({per_seed.shape[1]} seeds)")
    ax.fill_between(sparsity, per_seed.min(1), per_seed.max(1), color="tab:gray", alpha=0.2)
    ax.set_xlabel("fraction of rows pruned (no retraining)")
    ax.set_ylabel(result["metric"])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def posthoc(cfg: PosthocConfig) -> dict:
    """Run the sweep; writes `<output_dir>/posthoc.json` and `posthoc.png`, returns the JSON."""
    torch.manual_seed(cfg.seed)
    _, task, model = tasks.load_tokenizer_task_and_model(cfg)
    if getattr(model.config, "model_type", None) == "vp_bert":
        raise ValueError(f"{cfg.model} is a squeezed model: post-hoc pruning needs the full-size rows; "
                         "fine-tune the run's masked export (export_masked/, which launch/pretrain.py writes "
                         "beside export_squeezed/) and give that model")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    pruner = collect_statistics(model, task, cfg.batch_size, cfg.alpha, cfg.max_stat_batches)
    logger.info("statistics from %d batches of %s training data", pruner.steps_done, task.name)
    result = sweep(model, task, pruner, cfg.sparsities, cfg.random_seeds, cfg.seed, cfg.eval_batch_size)
    result.update(task=task.name, model=cfg.model, statistics_batches=pruner.steps_done,
                  total_rows=pruner.layout.total_rows, config=asdict(cfg))
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "posthoc.json").write_text(json.dumps(result, indent=2))
    plot(result, output_dir / "posthoc.png", f"{task.name}: pruning without retraining")
    return result
