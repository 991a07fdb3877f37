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


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run only where CUDA is available."""
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
