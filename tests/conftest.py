import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def one_thread():
    """Tiny models: thread hand-offs cost more than they save, badly so on a busy 2-core machine."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Test modules that share the session fixtures of tests/distributed/conftest.py (the 2-rank
# training launches): one xdist group, so that those launches run once.
SHARED_LAUNCH_MODULES = {"test_data_parallel.py", "test_repartition.py", "test_resume.py", "test_zero_rows.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) every module is one
    group, kept on one worker with its module and session fixtures; `@pytest.mark.gpu` tests run
    only where CUDA is available."""
    for item in items:
        module = item.path.name
        group = "distributed-launches" if module in SHARED_LAUNCH_MODULES else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    from skip_summary import slurm_skip_summary  # tests/ is on sys.path (above)

    lines = slurm_skip_summary(terminalreporter.stats.get("skipped", []))
    if lines:
        terminalreporter.write_sep("!", lines[0], red=True, bold=True)
        for line in lines[1:]:
            terminalreporter.write_line(line)
