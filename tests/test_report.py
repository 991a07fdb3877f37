"""The run report (SPEC 6): loading vp_report.json from any run or checkpoint, figures, report.md."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from helpers import load_script
from vp_dist.report import (ReportFormatError, ReportNotFoundError, find_report, load_report,
                            render_report, validate_report)
from vp_dist.report.summary import sparsity_grid

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TYPES = ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]
SUFFIXES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
BLOCKS, HIDDEN, INTERMEDIATE = 4, 128, 512
PRUNING_STEPS = [[20, 0.1], [40, 0.2], [60, 0.3]]
BLOCK_SHARE = [0.1, 0.2, 0.3, 0.4]  # share of a type's pruned rows that falls in each block
MIB = 1024 ** 2


def _layer_name(block: int, projection_type: str) -> str:
    return f"bert.encoder.layer.{block}.{SUFFIXES[projection_type]}"


def _pruned_per_block(total_pruned: int) -> list[int]:
    """Uneven split over blocks, as global per-type selection gives; the last block takes the rest."""
    counts = [math.floor(total_pruned * share) for share in BLOCK_SHARE[:-1]]
    return counts + [total_pruned - sum(counts)]


def make_report() -> dict:
    """A finished, squeezed 2-rank run of a 4-block BERT: 3 prune events, 60 steps in two phases."""
    layers = [{"name": _layer_name(block, t), "block": block, "type": t,
               "rows": INTERMEDIATE if t == "ffn_in" else HIDDEN}
              for block in range(BLOCKS) for t in TYPES]
    events = []
    for index, (step, target) in enumerate(PRUNING_STEPS):
        kept_rows, sparsity = {}, {}
        for t in TYPES:
            of_type = [layer for layer in layers if layer["type"] == t]
            total = sum(layer["rows"] for layer in of_type)
            pruned = round(target * total)
            for layer, count in zip(of_type, _pruned_per_block(pruned)):
                kept_rows[layer["name"]] = layer["rows"] - count
            sparsity[t] = pruned / total
        previous = sum(events[-1]["kept_rows"].values()) if events else sum(layer["rows"] for layer in layers)
        events.append({"step": step, "target_sparsity": target, "sparsity": sparsity, "kept_rows": kept_rows,
                       "newly_pruned": previous - sum(kept_rows.values())})
    history = []
    for step in range(1, 61):
        done = [event for event in events if event["step"] <= step]
        history.append({"step": step, "phase": "mlm" if step <= 40 else "nsp", "loss": 7.5 - 0.05 * step,
                        "lr": 1e-4, "tokens_per_s": 5000.0 + step,
                        "sparsity": sum(done[-1]["sparsity"].values()) / len(TYPES) if done else 0.0})
    before = [{"rank": rank, "parameter_bytes": 10 * MIB, "gradient_bytes": 5 * MIB,
               "optimizer_bytes": 10 * MIB, "max_memory_allocated": None} for rank in (0, 1)]
    after = [{"rank": 0, "parameter_bytes": 7 * MIB, "gradient_bytes": int(3.5 * MIB),
              "optimizer_bytes": 7 * MIB, "max_memory_allocated": None},
             {"rank": 1, "parameter_bytes": 7 * MIB, "gradient_bytes": 3 * MIB,
              "optimizer_bytes": 6 * MIB, "max_memory_allocated": None}]
    return {
        "version": 1,
        "model": {"model_type": "bert", "num_layers": BLOCKS, "hidden_size": HIDDEN,
                  "intermediate_size": INTERMEDIATE},
        "world_size": 2, "zero_stage": 2, "dtype": "fp32",
        "schedule": {"start": 20, "interval": 20, "increment": 0.1, "target": 0.3, "pruning_steps": PRUNING_STEPS},
        "projection_types": TYPES,
        "layers": layers,
        "prune_events": events,
        "history": history,
        "memory": {"before_squeeze": before, "after_squeeze": after},
        "throughput": {"tokens_per_s": 5030.5, "steps": 60, "seconds": 12.5},
        "squeezed": True,
        "parameters": {"before": 4_500_000, "after": 3_150_000},
    }


def mid_run_report() -> dict:
    """The copy a checkpoint at step 45 holds: two prune events, nothing squeezed yet."""
    report = make_report()
    report["prune_events"] = report["prune_events"][:2]
    report["history"] = report["history"][:45]
    del report["memory"]["after_squeeze"]
    del report["throughput"]
    report["squeezed"] = False
    report["parameters"]["after"] = None
    return report


def assert_valid_png(path: Path, min_width: int = 400, min_height: int = 250) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        width, height = image.size
    assert min_width <= width <= 3000 and min_height <= height <= 3000, (width, height)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = render_report(make_report(), out)
    return paths, paths["report"].read_text(encoding="utf-8")


def test_render_writes_heatmap_curves_and_markdown(rendered):
    paths, _ = rendered
    assert set(paths) == {"sparsity_heatmap", "training_curves", "report"}
    assert paths["sparsity_heatmap"].name == "sparsity_heatmap.png"
    assert_valid_png(paths["sparsity_heatmap"])
    assert_valid_png(paths["training_curves"])


def test_heatmap_cell_is_fraction_of_that_blocks_rows_pruned():
    grid = sparsity_grid(make_report())
    assert grid.blocks == [0, 1, 2, 3] and grid.types == TYPES
    # query at 30%: round(0.3 * 512) = 154 rows pruned, 15/30/46/63 of them in blocks 0..3.
    assert grid.pruned_fraction[:, 0].tolist() == [15 / 128, 30 / 128, 46 / 128, 63 / 128]
    # ffn_in at 30%: round(0.3 * 2048) = 614 rows, the last block takes 614 - 61 - 122 - 184 = 247.
    assert grid.kept[3, 4] == 512 - 247
    total_rows = 4 * (5 * 128 + 512)
    pruned = 5 * 154 + 614
    assert grid.overall == pytest.approx(pruned / total_rows)


def test_a_layer_pruned_to_one_row_does_not_read_as_fully_pruned(tmp_path):
    report = {"layers": [{"name": "wide", "block": 0, "type": "ffn_in", "rows": 4096},
                         {"name": "gone", "block": 0, "type": "value", "rows": 1024}],
              "prune_events": [{"step": 500, "kept_rows": {"wide": 1, "gone": 0}}]}
    grid = sparsity_grid(report)
    assert grid.pruned_fraction[0, TYPES.index("value")] == 1.0
    assert grid.overall == pytest.approx(5119 / 5120)
    markdown = render_report(report, tmp_path)["report"].read_text(encoding="utf-8")
    assert "| `wide` | 0 | ffn_in | 4,096 | 1 | 99.98% |" in markdown
    assert "| `gone` | 0 | value | 1,024 | 0 | 100.0% |" in markdown


def test_markdown_has_prune_steps_and_achieved_sparsity(rendered):
    _, markdown = rendered
    assert "Pruning steps: 20 (10%), 40 (20%), 60 (30%). Done: 3 of 3." in markdown
    # achieved = round(target * rows of type) / rows of type: 102/512 = 19.9% but 410/2048 = 20.0%
    assert "| 20 | 10.0% | 10.0% | 10.0% | 10.0% | 10.0% | 10.0% | 10.0% | 460 |" in markdown  # 5 * 51 + 205 rows
    assert f"| 40 | 20.0% | {'19.9% | ' * 4}20.0% | 19.9% | 460 |" in markdown


def test_markdown_has_kept_rows_of_each_layer(rendered):
    _, markdown = rendered
    assert "| `bert.encoder.layer.3.attention.self.query` | 3 | query | 128 | 65 | 49.2% |" in markdown
    assert "| `bert.encoder.layer.0.intermediate.dense` | 0 | ffn_in | 512 | 451 | 11.9% |" in markdown
    assert markdown.count("| `bert.encoder.layer.") == BLOCKS * len(TYPES)


def test_markdown_memory_table_in_mib_with_reduction(rendered):
    _, markdown = rendered
    # rank 0: 25 MiB -> 17.5 MiB is 30.0% less; rank 1: 25 -> 16 is 36.0%; both: 50 -> 33.5 is 33.0%.
    assert "| 0 | 10.00 → 7.00 | 5.00 → 3.50 | 10.00 → 7.00 | 25.00 → 17.50 | 30.0% | n/a |" in markdown
    assert "| 1 | 10.00 → 7.00 | 5.00 → 3.00 | 10.00 → 6.00 | 25.00 → 16.00 | 36.0% | n/a |" in markdown
    assert "All ranks: P+G+O 50.00 MiB → 33.50 MiB, a 33.0% reduction." in markdown


def test_markdown_has_throughput_parameters_and_figure_links(rendered):
    _, markdown = rendered
    assert "5,030.5 tokens/s: 60 steps in 12.5 s." in markdown
    assert "| mlm | 1–40 | 7.4500 | 5.5000 | 5,020.5 |" in markdown
    assert "| nsp | 41–60 | 5.4500 | 4.5000 | 5,050.5 |" in markdown
    assert "4,500,000 before squeezing → 3,150,000 after (30.0% fewer)." in markdown
    assert "![Per-layer sparsity](sparsity_heatmap.png)" in markdown
    assert "![Loss and sparsity by step](training_curves.png)" in markdown


class _StageZeroEngine:
    """What `partition_bytes` reads of a DeepSpeed engine without ZeRO in fp32 (stage 0): the
    module, whose parameters are the masters, and the torch optimizer holding the state."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def zero_optimization_stage(self) -> int:
        return 0


def _one_adamw_step(model):
    """A model and its AdamW after one step, so that the optimizer state exists."""
    import torch

    from helpers import loss_of
    from models import random_batch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_of(model, random_batch()).backward()
    optimizer.step()
    return _StageZeroEngine(model, optimizer)


def test_memory_recorded_by_partition_bytes_reads_the_same(tmp_path):
    """Entries as `partition_bytes` returns them (params_lp, params_fp32, gradients,
    optimizer_states, total), before and after a real squeeze, render as the bytes they hold; and
    the token count (what the training loop records), not steps."""
    from helpers import train
    from models import tiny_model
    from vp_dist import VPConfig
    from vp_dist.distributed import partition_bytes

    dense = tiny_model("bert-mlm", hidden_size=64, intermediate_size=256)
    pruner, _, _ = train(dense, VPConfig(start=1, interval=1, increment=0.5, target=0.5), steps=1)
    measured = {"before_squeeze": partition_bytes(_one_adamw_step(dense)),
                "after_squeeze": partition_bytes(_one_adamw_step(pruner.squeeze()))}
    # fp32 AdamW at stage 0: 4 bytes per element of weights, of gradients and of each Adam moment
    elements = sum(p.numel() for p in dense.parameters())
    dense_held = measured["before_squeeze"]
    assert (dense_held["params"], dense_held["gradients"]) == (4 * elements, 4 * elements)
    assert 8 * elements <= dense_held["optimizer_states"] <= 8 * elements + 4 * len(list(dense.parameters()))
    assert measured["after_squeeze"]["total"] < 0.8 * measured["before_squeeze"]["total"]

    report = make_report()
    for stage, held in measured.items():
        report["memory"][stage] = [{**held, "rank": rank, "max_memory_allocated": None} for rank in (0, 1)]
    report["throughput"] = {"tokens_per_s": 5030.5, "tokens": 62881, "seconds": 12.5}
    report["run_config"] = {"output_dir": "runs/x", "phases": [{"steps": 40}, {"steps": 20}]}
    markdown = render_report(report, tmp_path)["report"].read_text(encoding="utf-8")

    before, after = measured["before_squeeze"], measured["after_squeeze"]
    cells = [f"{before[key] / MIB:,.2f} → {after[key] / MIB:,.2f}"
             for key in ("params", "gradients", "optimizer_states", "total")]
    reduction = 100 * (before["total"] - after["total"]) / before["total"]
    for rank in (0, 1):
        assert f"| {rank} | {' | '.join(cells)} | {reduction:.1f}% | n/a |" in markdown
    assert "5,030.5 tokens/s: 62,881 tokens in 12.5 s." in markdown


def test_memory_entries_in_partition_bytes_names_count_the_fp32_master_as_parameters(tmp_path):
    """parameters = params_lp (module copy) + params_fp32 (master partition), which ZeRO holds apart."""
    report = make_report()
    for stage in ("before_squeeze", "after_squeeze"):
        report["memory"][stage] = [
            {"rank": entry["rank"], "params_lp": entry["parameter_bytes"] // 5,
             "params_fp32": entry["parameter_bytes"] - entry["parameter_bytes"] // 5,
             "gradients": entry["gradient_bytes"], "optimizer_states": entry["optimizer_bytes"],
             "params": entry["parameter_bytes"], "layers": {}, "max_memory_allocated": 64 * MIB,
             "total": entry["parameter_bytes"] + entry["gradient_bytes"] + entry["optimizer_bytes"]}
            for entry in report["memory"][stage]]
    report["throughput"] = {"tokens_per_s": 5030.5, "tokens": 62881, "seconds": 12.5}
    report["run_config"] = {"output_dir": "runs/x", "phases": [{"steps": 40}, {"steps": 20}]}
    markdown = render_report(report, tmp_path)["report"].read_text(encoding="utf-8")
    assert "| 1 | 10.00 → 7.00 | 5.00 → 3.00 | 10.00 → 6.00 | 25.00 → 16.00 | 36.0% | 64.00 → 64.00 |" in markdown
    assert "5,030.5 tokens/s: 62,881 tokens in 12.5 s." in markdown


def test_mid_run_report_renders_and_says_it_is_not_squeezed_yet(tmp_path):
    paths = render_report(mid_run_report(), tmp_path)
    markdown = paths["report"].read_text(encoding="utf-8")
    assert_valid_png(paths["sparsity_heatmap"])
    assert_valid_png(paths["training_curves"])
    assert "_Not in this report yet: memory after squeezing (the model is not squeezed yet)._" in markdown
    assert "| 0 | 10.00 | 5.00 | 10.00 | 25.00 | n/a |" in markdown
    assert "→" not in markdown.split("## Memory per rank")[1].split("##")[0]
    assert "Done: 2 of 3" in markdown and "60 (30%, pending)" in markdown
    assert "_Not in this report yet: run throughput" in markdown
    assert "_Not in this report yet: parameter count after squeezing._" in markdown
    # kept rows come from the last event present (step 40): block 3 takes 102 - 10 - 20 - 30 query rows
    assert "| `bert.encoder.layer.3.attention.self.query` | 3 | query | 128 | 86 | 32.8% |" in markdown


def test_checkpoint_before_first_pruning_renders_every_file(tmp_path):
    report = make_report()
    report["prune_events"], report["history"] = [], report["history"][:10]
    report["memory"] = {"before_squeeze": report["memory"]["before_squeeze"], "after_squeeze": []}
    paths = render_report(report, tmp_path)
    markdown = paths["report"].read_text(encoding="utf-8")
    assert "_Not in this report yet: no pruning step has run._" in markdown
    assert "No pruning yet: every row is kept." in markdown
    assert sparsity_grid(report).overall == 0.0
    assert_valid_png(paths["sparsity_heatmap"])


def test_empty_report_renders_with_every_section_saying_what_is_missing(tmp_path):
    paths = render_report({"version": 1}, tmp_path)
    markdown = paths["report"].read_text(encoding="utf-8")
    for missing in ("pruning schedule", "no pruning step has run", "list of prunable layers",
                    "memory measurements", "run throughput", "parameter count"):
        assert f"_Not in this report yet: {missing}" in markdown
    assert_valid_png(paths["sparsity_heatmap"], min_height=200)
    assert_valid_png(paths["training_curves"], min_height=200)


def _write(path: Path, report: dict, mtime: float | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "vp_report.json").write_text(json.dumps(report), encoding="utf-8")
    if mtime is not None:
        os.utime(path / "vp_report.json", (mtime, mtime))
    return path / "vp_report.json"


def _report_at(step: int) -> dict:
    return {"version": 1, "history": [{"step": step, "phase": "mlm", "loss": 1.0, "sparsity": 0.0}]}


def test_load_report_from_file_run_dir_and_checkpoint_folder(tmp_path):
    run_report = _write(tmp_path, _report_at(60))
    _write(tmp_path / "checkpoints" / "global_step20", _report_at(20))
    assert load_report(run_report)["history"][0]["step"] == 60
    assert load_report(tmp_path)["history"][0]["step"] == 60
    assert load_report(tmp_path / "checkpoints" / "global_step20")["history"][0]["step"] == 20


def test_load_report_takes_the_tag_named_by_deepspeeds_latest_file(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _write(checkpoints / "global_step20", _report_at(20), mtime=3000)
    _write(checkpoints / "global_step40", _report_at(40), mtime=1000)
    (checkpoints / "latest").write_text("global_step40\n")
    # a mid-run directory has no DIR/vp_report.json: the latest checkpoint's copy stands in
    assert load_report(tmp_path)["history"][0]["step"] == 40
    assert find_report(checkpoints) == checkpoints / "global_step40" / "vp_report.json"


def test_load_report_without_latest_file_takes_the_newest_folder(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _write(checkpoints / "global_step20", _report_at(20), mtime=1000)
    _write(checkpoints / "global_step40", _report_at(40), mtime=2000)
    (checkpoints / "global_step60").mkdir()  # saved by DeepSpeed, report not written: skipped
    assert load_report(checkpoints)["history"][0]["step"] == 40
    # equal times (e.g. a copied run directory): natural order of tags, so step 100 beats step 40
    _write(checkpoints / "global_step100", _report_at(100), mtime=2000)
    assert load_report(tmp_path)["history"][0]["step"] == 100


def test_latest_naming_a_tag_without_report_is_a_clear_error(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _write(checkpoints / "global_step20", _report_at(20))
    (checkpoints / "global_step40").mkdir()
    (checkpoints / "latest").write_text("global_step40")
    with pytest.raises(ReportNotFoundError, match="names tag 'global_step40'.*newest report is in .*global_step20"):
        load_report(tmp_path)


def test_nothing_to_load_is_a_clear_error(tmp_path):
    with pytest.raises(ReportNotFoundError, match="does not exist"):
        load_report(tmp_path / "no-such-run")
    with pytest.raises(ReportNotFoundError, match="no vp_report.json in"):
        load_report(tmp_path)


@pytest.mark.parametrize("cut", [0.5, 0.97], ids=["mid-structure", "near-end"])
def test_truncated_json_is_a_clear_error(tmp_path, cut):
    text = json.dumps(make_report(), indent=1)
    path = tmp_path / "vp_report.json"
    path.write_text(text[: int(cut * len(text))], encoding="utf-8")
    with pytest.raises(ReportFormatError, match=r"vp_report.json is truncated.*earlier checkpoint"):
        load_report(tmp_path)


def test_invalid_json_and_non_object_are_clear_errors(tmp_path):
    path = tmp_path / "vp_report.json"
    path.write_text('{"version": 1, oops}', encoding="utf-8")
    with pytest.raises(ReportFormatError, match="not valid JSON.*line 1"):
        load_report(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ReportFormatError, match="JSON list, expected an object"):
        load_report(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(ReportFormatError, match="is empty"):
        load_report(path)


def test_null_sections_read_as_not_there_yet(tmp_path):
    report = mid_run_report()
    report["memory"]["after_squeeze"], report["throughput"] = None, None
    report["prune_events"][-1]["sparsity"]["key"] = None
    markdown = render_report(report, tmp_path)["report"].read_text(encoding="utf-8")
    assert "| 40 | 20.0% | 19.9% | n/a | 19.9% |" in markdown
    assert "_Not in this report yet: run throughput" in markdown


def test_report_breaking_the_schema_is_refused_naming_each_field(tmp_path):
    report = make_report()
    report["layers"][5]["type"] = None
    del report["history"][3]["step"]
    report["memory"]["before_squeeze"][1]["optimizer_bytes"] = "10 MiB"
    with pytest.raises(ReportFormatError) as error:
        validate_report(report)
    message = str(error.value)
    assert "report.layers[5].type is null" in message
    assert "report.history[3].step is missing" in message
    assert "report.memory.before_squeeze[1].optimizer_bytes='10 MiB' must be an int" in message
    path = _write(tmp_path, report)
    with pytest.raises(ReportFormatError, match="vp_report.json does not follow vp_report schema"):
        load_report(path)


def _cli():
    return load_script(ROOT / "launch" / "report.py", "report_cli").main


def test_cli_renders_latest_checkpoint_next_to_the_run(tmp_path, capsys):
    _write(tmp_path / "checkpoints" / "global_step45", mid_run_report())
    (tmp_path / "checkpoints" / "latest").write_text("global_step45")
    assert _cli()([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    out = tmp_path / "report" / "global_step45"
    assert printed == [str(out / "sparsity_heatmap.png"), str(out / "training_curves.png"), str(out / "report.md")]
    assert "From `" in (out / "report.md").read_text(encoding="utf-8")


def test_cli_reports_a_missing_report_with_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli()([str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "error: no vp_report.json in" in capsys.readouterr().err
