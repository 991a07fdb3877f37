"""The hot path of the statistics: shifted first and second moments of one layer's outputs.

    a, b = shifted_moments(rows, valid, shift)
    a[i] = sum_j valid_j * (rows[j, i] - shift[i])
    b[i] = sum_j valid_j * (rows[j, i] - shift[i])**2

rows [N, d] in the activation's own dtype (fp32, bf16, fp16; never copied to float64); valid [N]
float32 0/1 or None (every row counts); shift [d] float32. a and b are float32 [d]: one micro-batch
accumulated in fp32, which `stats.StepSums` folds into its float64 step sums. Shifted by a value
close to the neuron's mean, b is a sum of small squares, so fp32 keeps the variance of a
near-constant neuron with a large mean (e.g. mean 1e4, std 1e-2), where y**2 sums would not.

Two implementations with one contract:
- `shifted_moments_torch`, the reference and the fallback everywhere (CPU, no Triton, and inside
  torch.compile, where Inductor fuses it into one read of the activation);
- `shifted_moments_triton`, one read of the activation in a Triton kernel, on CUDA where Triton
  imports. Each program reduces a tile of rows x columns in registers and adds it into its own
  slot of R partial sums; the partials are summed in a fixed order (deterministic, no atomics).
  `shifted_moments_into` is the same kernel adding into a caller's [R, d] partials: the hooks'
  hot path is then one launch per layer, the partials of every layer being summed once per step
  (`stats.StepSums`).
`launch/gpu_check.sh` tests the second against the first (`tests/test_stats_gpu.py`).

A padded position (valid 0) holding NaN or inf still poisons a and b (0 * inf = NaN) in both
implementations alike; the pruner then drops the step, which errs on the safe side.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; absent on CPU-only installs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

TRITON_AVAILABLE = triton is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def shifted_moments_torch(rows: torch.Tensor, valid: torch.Tensor | None,
                          shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one fp32 temporary (the centred rows), two reductions; see the module docstring."""
    centred = torch.sub(rows, shift)  # bf16/fp16 - fp32 promotes to fp32 in the same pass
    if valid is None:
        first = centred.sum(0)
        second = centred.square_().sum(0)
    else:
        first = valid @ centred
        second = valid @ centred.square_()
    return first, second


def kernel_runs_on(rows: torch.Tensor) -> bool:
    """Whether the Triton kernel serves `rows`: CUDA tensors where Triton imports (any tensor in
    Triton's interpreter, TRITON_INTERPRET=1, which the CPU tests use), not while torch.compile
    traces (Inductor fuses the torch form)."""
    return TRITON_AVAILABLE and (rows.is_cuda or _INTERPRETED) and not torch.compiler.is_compiling()


def shifted_moments(rows: torch.Tensor, valid: torch.Tensor | None,
                    shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on CUDA where available (not while torch.compile traces), else torch."""
    if TRITON_AVAILABLE and rows.is_cuda and not torch.compiler.is_compiling():
        return shifted_moments_triton(rows, valid, shift)
    return shifted_moments_torch(rows, valid, shift)


if TRITON_AVAILABLE:  # pragma: no cover - runs in launch/gpu_check.sh only
    @triton.jit
    def _shifted_moments_kernel(rows_ptr, valid_ptr, shift_ptr, first_ptr, second_ptr,
                                num_rows, width, row_stride, out_stride, rows_per_program,
                                HAS_VALID: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        col_block, row_block = tl.program_id(0), tl.program_id(1)
        cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = cols < width
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        first = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        second = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        begin = row_block * rows_per_program
        end = tl.minimum(begin + rows_per_program, num_rows)
        for start in range(begin, end, BLOCK_ROWS):
            row_index = start + tl.arange(0, BLOCK_ROWS)
            row_ok = row_index < end
            ok = row_ok[:, None] & col_ok[None, :]
            values = tl.load(rows_ptr + row_index[:, None] * row_stride + cols[None, :], mask=ok, other=0.0)
            centred = tl.where(ok, values.to(tl.float32) - shift[None, :], 0.0)
            if HAS_VALID:
                weight = tl.load(valid_ptr + row_index, mask=row_ok, other=0.0)
                weighted = centred * weight[:, None]
            else:
                weighted = centred
            first += tl.sum(weighted, axis=0)
            second += tl.sum(weighted * centred, axis=0)
        out = row_block * out_stride + cols
        # Added to this program's own slot of the partial sums: no other program writes it.
        first += tl.load(first_ptr + out, mask=col_ok, other=0.0)
        second += tl.load(second_ptr + out, mask=col_ok, other=0.0)
        tl.store(first_ptr + out, first, mask=col_ok)
        tl.store(second_ptr + out, second, mask=col_ok)


def shifted_moments_triton(rows: torch.Tensor, valid: torch.Tensor | None, shift: torch.Tensor,
                           block_rows: int = 32, block_cols: int = 128,
                           row_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel (CUDA): one read of `rows`; same contract as `shifted_moments_torch`."""
    _require_triton()
    if row_blocks is None:  # enough programs to fill the GPU, few partials to add up
        col_blocks = triton.cdiv(rows.shape[-1], block_cols)
        row_blocks = max(1, min(triton.cdiv(rows.shape[0], block_rows),
                                triton.cdiv(4 * _multiprocessors(rows.device), col_blocks)))
    partial_first = torch.zeros(row_blocks, rows.shape[-1], dtype=torch.float32, device=rows.device)
    partial_second = torch.zeros_like(partial_first)
    shifted_moments_into(rows, valid, shift.contiguous(), partial_first, partial_second, block_rows, block_cols)
    return partial_first.sum(0), partial_second.sum(0)


def shifted_moments_into(rows: torch.Tensor, valid: torch.Tensor | None, shift: torch.Tensor,
                         first_out: torch.Tensor, second_out: torch.Tensor,
                         block_rows: int = 32, block_cols: int = 128) -> None:
    """Add the shifted moments of `rows` into partial sums `first_out`, `second_out` [R, d] fp32
    (views of a larger workspace are fine: rows of any stride, columns contiguous): the rows are
    cut into R blocks, and block r adds its sums into row r. One kernel launch and nothing else,
    the statistics hooks' hot path; summing the R partials (in a fixed order) is the caller's."""
    _require_triton()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows, width = rows.shape
    row_blocks = first_out.shape[0]
    rows_per_program = triton.cdiv(triton.cdiv(max(num_rows, 1), row_blocks), block_rows) * block_rows
    has_valid = valid is not None
    _shifted_moments_kernel[(triton.cdiv(width, block_cols), row_blocks)](
        rows, valid if has_valid else shift, shift, first_out, second_out,
        num_rows, width, rows.stride(0), first_out.stride(0), rows_per_program,
        HAS_VALID=has_valid, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)


def _require_triton() -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton statistics kernel needs Triton (pip install triton, CUDA only); "
                           "use shifted_moments_torch")


_MULTIPROCESSORS: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    """The device's SM count, asked once per device (not on every call of the hot path)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _MULTIPROCESSORS[index]
