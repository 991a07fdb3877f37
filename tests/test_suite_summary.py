"""The test run's own reporting: a skipped Slurm suite is announced, not left in the skip count."""
from types import SimpleNamespace

from skip_summary import slurm_skip_summary


def skipped(nodeid: str, reason: str):
    return SimpleNamespace(nodeid=nodeid, longrepr=(f"/repo/{nodeid.split('::')[0]}", 60, f"Skipped: {reason}"))


def test_skipped_slurm_tests_are_counted_with_their_reason():
    reports = [skipped(f"tests/test_slurm.py::test_{n}", "Slurm tests NOT run: apt-get could not install "
                                                          "slurm-wlm:\nE: Unable to locate package") for n in "abc"]
    reports.append(skipped("tests/test_fused.py::test_apex", "needs NVIDIA apex"))
    lines = slurm_skip_summary(reports)
    assert lines[0] == "3 Slurm test(s) NOT run (skipped): apt-get could not install slurm-wlm:"
    assert "not tested by this run" in lines[1]


def test_nothing_is_said_when_no_slurm_test_was_skipped():
    assert slurm_skip_summary([skipped("tests/test_fused.py::test_apex", "needs NVIDIA apex")]) == []
