"""The statistics' hot path (vp_dist.stats_kernels): the torch reference against its float64
definition, and the Triton kernel against the torch reference in Triton's CPU interpreter where
Triton is installed (on a GPU, tests/test_stats_gpu.py runs the compiled kernel)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vp_dist.stats_kernels import shifted_moments, shifted_moments_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_reference_is_the_shifted_moments_of_the_values_as_given(dtype, masked):
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(40, generator=g) * 100
    values = (centre + torch.randn(300, 40, generator=g)).to(dtype)
    shift = (centre + 0.1 * torch.randn(40, generator=g)).float()
    valid = (torch.rand(300, generator=g) > 0.3).float() if masked else None
    first, second = shifted_moments_torch(values, valid, shift)
    weight = torch.ones(300, dtype=torch.float64) if valid is None else valid.double()
    centred = values.double() - shift.double()
    assert first.dtype == second.dtype == torch.float32
    torch.testing.assert_close(first.double(), weight @ centred, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(second.double(), weight @ centred.square(), rtol=1e-5, atol=1e-4)
    assert values.dtype == dtype  # read as is, never converted in place


def test_the_dispatcher_uses_the_torch_reference_off_cuda():
    values, shift = torch.randn(5, 3), torch.zeros(3)
    for a, b in zip(shifted_moments(values, None, shift), shifted_moments_torch(values, None, shift)):
        assert torch.equal(a, b)


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from vp_dist import stats_kernels as sk
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, width in ((200, 300), (7, 130), (1, 1), (64, 96)):
            for masked in (False, True):
                centre = torch.randn(width) * 100
                values = (centre + torch.randn(rows, width)).to(dtype)
                shift = (centre + 0.1 * torch.randn(width)).float()
                valid = (torch.rand(rows) > 0.3).float() if masked else None
                want = sk.shifted_moments_torch(values, valid, shift)
                got = sk.shifted_moments_triton(values, valid, shift, row_blocks=3)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (float(b.abs().max()) + 1e-30))
    strided = torch.randn(64, 2, 96)[:, 1, :]
    for a, b in zip(sk.shifted_moments_triton(strided, None, torch.zeros(96), row_blocks=2),
                    sk.shifted_moments_torch(strided, None, torch.zeros(96))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # StepSums' deferred mode (the pruner's): one kernel per layer into the shared fp32 workspace,
    # counts per forward pass, folded at flush(), equals the plain mode's float64 sums.
    from vp_dist.stats import MeterLayout, MomentWorkspace, StepSums
    layout = MeterLayout((40, 7, 130))
    plain = StepSums(layout, "cpu")
    deferred = StepSums(layout, "cpu", deferred=True, workspace=MomentWorkspace(layout, row_blocks=4))
    shift = torch.randn(layout.total_rows) * 10
    for sums in (plain, deferred):
        sums.begin(shift, centre_each_batch=False)
    for forward in range(3):
        mask = (torch.rand(5 * 9) > 0.25).float() if forward != 1 else None
        outputs = [(shift[o:o + d] + torch.randn(5, 9, d)).to(torch.bfloat16)
                   for o, d in zip(layout.offsets, layout.sizes)]
        for sums in (plain, deferred):
            for layer, output in enumerate(outputs):
                sums.accumulate(layer, output, mask, None if mask is None else mask.sum().long())
        deferred.end_forward()
    assert deferred.workspace.tensor is not None and deferred.sum.abs().sum() == 0  # all still in partials
    deferred.flush()
    assert deferred.workspace.tensor.abs().sum() == 0
    torch.testing.assert_close(deferred.buffer, plain.buffer, rtol=1e-5, atol=1e-5)  # fp32 across forwards
    print("ok")
""")


def test_triton_kernel_matches_the_torch_reference_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton not installed (CUDA builds of torch bring it)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
