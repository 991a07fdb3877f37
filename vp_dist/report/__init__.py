"""The run report (SPEC 6): what a Variance Pruning run leaves behind, as figures and Markdown.

The training loop writes `DIR/vp_report.json` at the end of a run and a copy into every
checkpoint folder. Its schema (version 1); a report from a checkpoint may lack any section::

    version, model {model_type, num_layers, hidden_size, ...}, world_size, zero_stage, dtype,
    schedule {start, interval, increment, target, pruning_steps [[step, sparsity], ...]},
    projection_types [...], layers [{name, block, type, rows}],
    prune_events [{step, target_sparsity, sparsity {type: fraction}, kept_rows {layer: int},
                   newly_pruned}],
    history [{step, phase, loss, lr, tokens_per_s, sparsity (mean over types)}],
    memory {before_squeeze, after_squeeze: [{rank, parameter_bytes, gradient_bytes, optimizer_bytes,
            max_memory_allocated}]},
    throughput {tokens_per_s, steps, seconds}, squeezed, parameters {before, after}

    report = load_report("runs/bert")            # or a JSON, or runs/bert/checkpoints[/<tag>]
    paths = render_report(report, "runs/bert/report")
"""
from .load import ReportFormatError, ReportNotFoundError, default_out_dir, find_report, load_report
from .render import render_report
from .schema import validate_report

__all__ = ["load_report", "find_report", "default_out_dir", "render_report", "validate_report", "ReportNotFoundError",
           "ReportFormatError"]
