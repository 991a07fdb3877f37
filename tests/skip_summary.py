"""The run's final summary names skipped Slurm tests (tests/conftest.py calls this)."""
SLURM_NOT_RUN = "Slurm tests NOT run"  # the skip reason's prefix in test_slurm.py


def slurm_skip_summary(skipped_reports) -> list[str]:
    """Lines for the run's final summary when Slurm tests were skipped (no root, or apt could not
    install Slurm): how many, and why; nothing when they all ran."""
    reasons, count = [], 0
    for report in skipped_reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if SLURM_NOT_RUN not in reason:
            continue
        count += 1
        first_line = reason.split(SLURM_NOT_RUN + ": ", 1)[-1].splitlines()[0]
        if first_line not in reasons:
            reasons.append(first_line)
    if not count:
        return []
    return [f"{count} Slurm test(s) NOT run (skipped): {'; '.join(reasons)}",
            "launch/slurm/pretrain.sbatch was not tested by this run; run the suite as root where apt works"]

