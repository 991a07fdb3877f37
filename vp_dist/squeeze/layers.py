"""`SqueezedLinear`: a linear layer that stores only its kept rows (SPEC 5).

Self-contained (imports torch only), so a compact export can bundle it; see
`vp_dist.export.SELF_CONTAINED_MODULES`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SqueezedLinear(nn.Module):
    """Linear layer with only its kept rows stored densely.

    weight [k, in_features], bias [out_features], kept_rows int64 [k] (sorted output positions).
    forward(x [..., in_features]) -> [..., out_features]: the bias everywhere, `x W^T + bias` at
    the kept rows. The kept rows are written with a deterministic `index_copy` (not an atomic
    `index_add`) into the bias, cast to the product's dtype: under `torch.autocast` (bf16, fp16)
    the output has the autocast dtype, exactly as `nn.Linear`'s would, and bf16/fp16 weights work.
    Shapes and indices are static, so the layer compiles without graph breaks.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, kept_rows: torch.Tensor):
        super().__init__()
        if weight.shape[0] != kept_rows.numel():
            raise ValueError(f"weight has {weight.shape[0]} rows but kept_rows has {kept_rows.numel()}")
        self.in_features = weight.shape[1]
        self.out_features = bias.shape[0]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.register_buffer("kept_rows", kept_rows.to(torch.long), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = F.linear(x, self.weight, self.bias[self.kept_rows])
        if torch.onnx.is_in_onnx_export():
            return self._gathered(kept)
        full = self.bias.to(kept.dtype).expand(*kept.shape[:-1], self.out_features)
        return full.index_copy(-1, self.kept_rows, kept)

    def _gathered(self, kept: torch.Tensor) -> torch.Tensor:
        """The same values as the index_copy (bitwise), as a gather that ONNX exports with dynamic
        batch and sequence sizes: output j reads column source[j] of the kept rows where row j was
        kept, the bias where it was pruned. Used while exporting to ONNX only."""
        count = self.kept_rows.numel()
        source = torch.full((self.out_features,), count, dtype=torch.long, device=kept.device)
        source = source.index_copy(0, self.kept_rows, torch.arange(count, device=kept.device))
        padded = torch.cat([kept, kept.new_zeros(*kept.shape[:-1], 1)], dim=-1)
        return torch.where(source < count, padded.index_select(-1, source), self.bias.to(kept.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={self.weight.shape[0]}"
