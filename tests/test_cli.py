"""Typed configuration and command lines (vp_dist/cli.py): one schema for file, flags, --help, errors."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vp_dist import cli
from vp_dist.config import VPConfig
from vp_dist.downstream.finetune import FinetuneConfig
from vp_dist.train.config import HIDDEN_FIELDS, RunConfig, changed_settings, load_run_config, read_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "launch/configs/demo.yaml")


def run_in_process(script: str, *args: str, capsys) -> tuple[int, str, str]:
    """Run launch/<script> as __main__ in this process: (exit status, stdout, stderr).

    Any exception other than SystemExit propagates and fails the test: that is the traceback a
    user would have seen."""
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(ROOT / "launch" / script), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def run_command(script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    # A clean PYTHONPATH: the scripts must find this checkout's vp_dist on their own.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd or "/")


def test_scientific_notation_becomes_a_float_in_file_and_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nvp: {alpha: 1e-1, start: 3}\n")  # YAML 1.1 reads both as strings
    loaded = load_run_config(str(config), ["vp.increment=5e-2"])
    assert loaded.lr == 1e-4 and isinstance(loaded.lr, float)
    assert loaded.vp == VPConfig(start=3, alpha=0.1, increment=0.05)


@pytest.mark.parametrize("override, named", [
    ("lr=abc", "lr: Input should be a valid number"),
    ("vp.start=1.5", "vp.start: Input should be a valid integer"),
    ("vp.target=1.2", "target=1.2 must be in (0, 1)"),
    ("phases.mlm.steps=x", "phases.0.steps"),
    ("phases.nsp.global_batch=15", "phases[1] (nsp): global_batch=15 must be a multiple of micro_batch=4"),
    ("data.vocab_size=[1]", "data.vocab_size"),
    ("model.overrides=3", "model.overrides: Input should be a valid dictionary"),
    ("vp.bogus=1", "vp.bogus: unknown field"),
    ("vp.squeeze_at_target=true", "set the run's squeeze_at_target instead"),
    ("phases.zz.steps=1", "phases.zz: no list item 'zz'"),
    # refused before the run starts (they used to fail inside DeepSpeed, torch or the data pipeline)
    ("lr=-1", "lr=-1.0 must be > 0"),
    ("warmup_steps=0", "warmup_steps=0 must be >= 1"),
    ("log_every=0", "log_every=0 must be >= 1"),
    ("stop_after=-1", "stop_after=-1 must be >= 0"),
    ("dist_timeout_minutes=0", "dist_timeout_minutes=0 must be >= 1"),
    ("grad_accum_dtype=xx", "grad_accum_dtype='xx' must be auto, fp32, bf16 or fp16"),
    ("model.fused_layernorm=maybe", "model.fused_layernorm='maybe' must be auto, on or off"),
    ("model.config=/no/such/config.json", "model.config='/no/such/config.json' does not exist"),
    ("model.overrides={num_hidden_layer: 1}", "model.overrides: BertConfig has no field 'num_hidden_layer'"),
    ("model.overrides={num_attention_heads: 5}", "hidden_size=128 must be a multiple of num_attention_heads=5"),
    ("phases.mlm.mlm_probability=1.5", "phases[0] (mlm): mlm_probability=1.5 must be in (0, 1)"),
    ("data.vocab_size=0", "data.vocab_size=0 must be larger than the 5 special tokens"),
    ("data.corpus=/no/such/corpus.txt", "data.corpus='/no/such/corpus.txt' does not exist"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
])
def test_bad_values_are_refused_naming_the_field(override, named):
    with pytest.raises(cli.ConfigError) as error:
        load_run_config(DEMO, [override])
    assert named in str(error.value)


def test_every_field_is_a_flag_with_type_default_and_meaning(capsys):
    code, out, err = run_in_process("pretrain.py", "--help", capsys=capsys)
    assert code == 0, err
    text = " ".join(out.split())  # argparse wraps lines
    for leaf in cli.settable_fields(RunConfig, hidden=HIDDEN_FIELDS):
        assert f"--{leaf.path} " in text, leaf.path
    assert "--lr FLOAT [float] peak learning rate" in text and "(default: 0.0005)" in text
    assert "--vp.alpha FLOAT [float] EWMV weight of the newest step variance" in text
    assert "--phases.<name|index>.steps [int] optimizer steps in this phase (default: 100)" in text
    assert "--vp.squeeze_at_target" not in text and "--vp.families" not in text


def test_a_new_field_is_picked_up_with_its_comment_or_a_generic_help():
    @dataclasses.dataclass
    class Extra:
        documented: float = 0.5   # a meaning from the comment
        helped: int = dataclasses.field(default=1, metadata={"help": "from the metadata"})
        bare: str = "x"

    leaves = {leaf.path: leaf for leaf in cli.settable_fields(Extra)}
    assert leaves["documented"].help == "a meaning from the comment"
    assert leaves["helped"].help == "from the metadata"
    assert leaves["bare"].help == cli.GENERIC_HELP
    assert cli.validate(Extra, {"documented": "2e-1", "helped": "3"}) == Extra(0.2, 3)


def test_command_line_flags_resolve_to_typed_values():
    # A real process from another directory and no PYTHONPATH: what a user types.
    result = run_command("pretrain.py", "--config", DEMO, "--lr", "1e-4", "--vp.alpha", "1e-1",
                         "--phases.nsp.steps", "3", "log_every=2", "--render_report", "false", "--print_config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["lr"] == 1e-4 and printed["vp"]["alpha"] == 0.1 and printed["log_every"] == 2
    assert [p["steps"] for p in printed["phases"]] == [90, 3] and printed["render_report"] is False
    # What --print_config prints is a run config that reads back to the same thing.
    assert cli.validate(RunConfig, printed).to_dict() == printed


@pytest.mark.parametrize("args, message", [
    (["--lr", "abc"], "lr: Input should be a valid number"),
    (["--vp.alpha", "2"], "alpha=2.0 must be in (0, 1]"),
    (["--deepspeed_config", "/no/such/ds.json"], "deepspeed_config='/no/such/ds.json': No such file"),
    (["--deepspeed_config", str(ROOT / "README.md")], "not valid JSON"),
    (["--phases.mlm.global_batch", "30"], "global_batch=30 must be a multiple of micro_batch=8"),
])
def test_pretrain_refuses_bad_input_with_status_2(args, message, capsys):
    code, _, err = run_in_process("pretrain.py", "--config", DEMO, *args, capsys=capsys)
    assert code == 2 and message in err, err


def test_deepspeed_batch_sizes_are_checked_against_the_launchers_world_size(tmp_path, monkeypatch, capsys):
    config = load_run_config(DEMO, [f"deepspeed_config={ROOT / 'ds_configs/zero2_cpu.json'}"])
    assert read_deepspeed_config(config, 2)["zero_optimization"]["stage"] == 2
    with pytest.raises(cli.ConfigError, match=r"phases\[0\] \(mlm\): global_batch=32 is not a multiple of "
                                              r"micro_batch=8 x world_size=3"):
        read_deepspeed_config(config, 3)
    later = load_run_config(DEMO, ["phases.nsp.micro_batch=8"])  # 32 = 8 x 4 ranks; 16 < 8 x 4
    with pytest.raises(cli.ConfigError, match=r"phases\[1\] \(nsp\): global_batch=16 .* x world_size=4"):
        read_deepspeed_config(later, 4)
    both = tmp_path / "ds.json"
    both.write_text(json.dumps({"fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    with pytest.raises(cli.ConfigError, match="both fp16 and bf16"):
        read_deepspeed_config(dataclasses.replace(config, deepspeed_config=str(both)), 1)
    monkeypatch.setenv("WORLD_SIZE", "3")  # the launcher's, read before any process group starts
    code, _, err = run_in_process("pretrain.py", "--config", DEMO, capsys=capsys)
    assert code == 2 and "world_size=3" in err


@pytest.mark.parametrize("script, args, message", [
    ("finetune.py", ["--task", "mrpc", "--model", "m"], "output_dir: required, give --output_dir"),
    ("finetune.py", ["--task", "mrpc", "--model", "m", "--output_dir", "o", "--lr", "x"], "lr: Input should be"),
    ("finetune.py", ["--task", "mrpc", "--model", "m", "--output_dir", "o", "--deepspeed_config", "/no.json"],
     "deepspeed_config='/no.json'"),
    ("finetune.py", ["--task", "mrpc", "--model", "m", "--output_dir", "o", "--deepspeed_config",
                     str(ROOT / "tests/fixtures/ds_fp16_and_bf16.json")], "enables both fp16 and bf16"),
    ("finetune.py", ["--task", "mrcp", "--model", "m", "--output_dir", "o"], "unknown GLUE task 'mrcp'"),
    ("finetune.py", ["--task", "mrpc", "--model", "m", "--output_dir", "o", "--masks", "masks.bin"],
     "masks='masks.bin' must be a .safetensors file"),
    ("finetune.py", ["--task", "mrpc", "--model", "/", "--output_dir", "o"], "is no model folder (no config.json)"),
    ("posthoc.py", ["--task", "mrpc", "--model", "m", "--output_dir", "o", "--batch_size", "0"],
     "batch_size=0 must be >= 1"),
    ("posthoc.py", ["--task", "squad", "--model", "m", "--output_dir", "o", "--max_seq_len", "128"],
     "doc_stride=128 must be in (0, max_seq_len=128)"),
    ("posthoc.py", ["--task", "mrpc", "--model", "m", "--output_dir", "o", "--sparsities", "0,1.0"],
     "sparsities [1.0] must be in [0, 1)"),
    ("report.py", ["/no/such/run"], "report.py: error:"),
    ("report.py", [str(ROOT / "tests/fixtures/ds_fp16_and_bf16.json")], "report.py: error:"),
    ("bench_squeeze.py", ["--repeats", "x"], "invalid int value"),
    ("bench_finetune.py", ["--steps", "x"], "invalid int value"),
    ("stats_allreduce_size.py", ["--bogus"], "unrecognized arguments"),
])
def test_every_command_refuses_bad_input_with_status_2(script, args, message, capsys):
    code, _, err = run_in_process(script, *args, capsys=capsys)
    assert code == 2 and message in err, err


def test_every_command_has_help_and_runs_from_a_checkout():
    # One interpreter, a clean PYTHONPATH and another working directory: each script finds this
    # checkout's vp_dist itself (sys.path), and --help exits 0 with its usage.
    scripts = ["pretrain.py", "finetune.py", "posthoc.py", "report.py", "bench_squeeze.py", "bench_finetune.py",
               "stats_allreduce_size.py"]
    code = (f"import runpy, sys\nfor name in {scripts!r}:\n"
            f"    sys.argv = [name, '--help']\n"
            f"    try:\n        runpy.run_path('{ROOT}/launch/' + name, run_name='__main__')\n"
            f"    except SystemExit as stop:\n        assert stop.code in (0, None), (name, stop.code)\n"
            f"    import vp_dist\n    assert vp_dist.__file__.startswith('{ROOT}/'), vp_dist.__file__\n"
            f"    print('HELP-OK', name)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("HELP-OK")] == scripts


def readme_commands() -> dict[str, set[str]]:
    """launch script -> the flags the README passes it (`launch/NAME.py --flag ...`, code blocks'
    continued lines joined; a command ends at a backtick, a line's end or a table cell's `|`)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())
    commands: dict[str, set[str]] = {}
    for script, rest in re.findall(r"\blaunch/(\w+\.py)([^`\n|]*)", text):
        commands.setdefault(script, set()).update(re.findall(r"(?<![\w-])(--[a-zA-Z][\w.-]*)", rest))
    return commands


def test_readme_commands_use_only_scripts_and_flags_that_exist():
    """Every `launch/*.py` command the README shows names a script of this checkout, and each flag it
    passes is in that script's --help: a renamed or dropped option cannot leave the README stale."""
    commands = readme_commands()
    assert {"pretrain.py", "finetune.py", "bench_squeeze.py"} <= set(commands)  # the parse finds them
    assert {"--config", "--vp.target"} <= commands["pretrain.py"]
    missing = sorted(name for name in commands if not (ROOT / "launch" / name).is_file())
    assert not missing, f"the README runs scripts that do not exist: {missing}"
    names = sorted(commands)
    code = (f"import contextlib, io, runpy, sys\nfor name in {names!r}:\n"
            f"    sys.argv, out = [name, '--help'], io.StringIO()\n"
            f"    with contextlib.redirect_stdout(out):\n"
            f"        try:\n            runpy.run_path('{ROOT}/launch/' + name, run_name='__main__')\n"
            f"        except SystemExit:\n            pass\n"
            f"    print('HELP-OF', name)\n    print(out.getvalue())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    helps = dict(zip(names, re.split(r"^HELP-OF \S+$", result.stdout, flags=re.M)[1:]))
    unknown = {name: sorted(flag for flag in commands[name]
                            if not re.search(re.escape(flag) + r"(?![\w.-])", helps[name])) for name in names}
    unknown = {name: flags for name, flags in unknown.items() if flags}
    assert not unknown, f"README flags that the scripts do not define: {unknown}"


def test_readme_paths_exist():
    """Each repository path the README names (`launch/...`, `ds_configs/...`, `tests/...`, ...) is in
    this checkout: brace lists expanded (`zero{1,2,3}_cpu.json`), `module.attribute` read as the module."""
    text = (ROOT / "README.md").read_text()
    pattern = r"\b((?:launch|ds_configs|docker|tests|vp_dist|\.ci)/[\w./{},-]*\w}?[\w.]*)"
    missing = []
    for path in sorted(set(re.findall(pattern, text))):
        variants = [path]
        while any("{" in v for v in variants):
            expanded = []
            for v in variants:
                head, _, tail = v.partition("{")
                choices, _, rest = tail.partition("}")
                expanded += [head + choice + rest for choice in choices.split(",")]
            variants = expanded
        for variant in variants:
            module = variant.rsplit(".", 1)[0] + ".py"
            if not (ROOT / variant).exists() and not (ROOT / module).is_file():
                missing.append(variant)
    assert len(set(re.findall(pattern, text))) > 50  # the README names many
    assert not missing, f"paths the README names that this checkout lacks: {missing}"


def test_finetune_flags_are_typed_and_printed(capsys):
    code, out, err = run_in_process("finetune.py", "--task", "mrpc", "--model", "m", "--output_dir", "o",
                                    "--lr", "1e-4", "--no-save_model", "--max_steps", "null", "--print_config",
                                    capsys=capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["lr"] == 1e-4 and printed["save_model"] is False and printed["max_steps"] is None
    assert FinetuneConfig(**printed).lr == 1e-4


def test_vpconfig_from_text_converts_and_the_constructor_checks_types():
    assert VPConfig.from_dict({"alpha": "1e-1", "start": "3"}) == VPConfig(alpha=0.1, start=3)
    with pytest.raises(ValueError, match="alpha='1e-1' must be a number"):
        VPConfig(alpha="1e-1")
    with pytest.raises(cli.ConfigError, match="bogus: unknown field"):
        VPConfig.from_dict({"bogus": 1})


def test_settings_changed_on_resume_are_listed_operational_ones_left_out():
    before = load_run_config(DEMO).to_dict()
    after = load_run_config(DEMO, ["vp.target=0.75", "phases.nsp.steps=3", "data.vocab_size=1000",
                                   "stop_after=3", "log_every=1"]).to_dict()
    assert changed_settings(before, after) == ["data.vocab_size: 4096 -> 1000", "phases.1.steps: 10 -> 3",
                                               "vp.target: 0.5 -> 0.75"]
    assert changed_settings(before, before) == []
