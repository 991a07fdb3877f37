"""FLOPs of a BERT pre-training step, counted from the model as it is now (dense, masked or squeezed).

Only matrix multiplications count (2 FLOPs per multiply-add); layer norms, softmax, GELU and the
embedding lookups are left out, as in the MFU convention of PaLM/Megatron. A masked layer still
multiplies its zero rows (the GPU does the work); a squeezed layer counts its kept rows only, a
folded FFN its smaller matrices. Backward costs twice the forward: a training step is 3x forward.

    flops = model_flops(engine.module)                    # once, and again after the squeeze
    step_flops = flops.training(sequences, seq_len, predictions)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

#: dense bf16/fp16 tensor-core peak TFLOP/s per GPU (vendor data sheets, no sparsity), matched
#: in order against torch.cuda.get_device_name(); fp32 runs get no MFU unless `peak_tflops` is set.
PEAK_TFLOPS_16BIT = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 125.0), ("A10", 125.0),
    ("V100", 125.0), ("T4", 65.0),
)

_HEAD_PER_PREDICTION = ("cls.predictions", "lm_head")      # MLM transform + decoder
_HEAD_PER_SEQUENCE = ("pooler", "cls.seq_relationship")     # pooled [CLS] -> NSP


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of the model's matmuls, split by what they scale with."""

    per_token: int           # encoder linear layers (Q, K, V, attention output, FFN in/out), per token
    per_prediction: int      # MLM head, per position its logits are computed at
    per_sequence: int        # pooler and NSP head, per sequence
    attention_per_pair: int  # Q K^T and attention x V over all layers, per (query, key) pair

    def forward(self, sequences: int, seq_len: int, predictions: int) -> int:
        tokens = sequences * seq_len
        return (tokens * self.per_token + predictions * self.per_prediction + sequences * self.per_sequence
                + tokens * seq_len * self.attention_per_pair)

    def training(self, sequences: int, seq_len: int, predictions: int) -> int:
        """Forward + backward (activation and weight gradients): 3x the forward FLOPs."""
        return 3 * self.forward(sequences, seq_len, predictions)


def _weight_shape(module: nn.Module):
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3 partitions keep the full shape


def _is_matmul(module: nn.Module) -> bool:
    from ..squeeze import SqueezedLinear
    from ..squeeze.tensor_parallel import ColumnParallelSqueezedLinear, RowParallelSqueezedLinear
    # tensor-parallel squeezed layers: this rank's share of the matmul
    return isinstance(module, (nn.Linear, SqueezedLinear, ColumnParallelSqueezedLinear, RowParallelSqueezedLinear))


def model_flops(model: nn.Module) -> ModelFlops:
    """Count `model`'s matmuls (a Hugging Face BERT-style model, or an engine's `.module`).

    A block with a `matmul_flops()` method (the squeezed attention, `SqueezedBertAttention`) counts
    what it runs itself, its attention scores included; other layers' attention is the dense one."""
    per_token = per_prediction = per_sequence = attention = 0
    counted_blocks: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(block + ".") for block in counted_blocks):
            continue
        if hasattr(module, "matmul_flops"):
            block_per_token, block_per_pair = module.matmul_flops()
            per_token, attention = per_token + block_per_token, attention + block_per_pair
            counted_blocks.append(name)
            continue
        if not _is_matmul(module):
            continue
        rows, cols = _weight_shape(module)
        flops = 2 * rows * cols
        if any(part in name for part in _HEAD_PER_PREDICTION):
            per_prediction += flops
        elif any(part in name for part in _HEAD_PER_SEQUENCE):
            per_sequence += flops
        else:
            per_token += flops
    config = model.config
    head_width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dense_layers = config.num_hidden_layers - len(counted_blocks)
    attention += 2 * 2 * config.num_attention_heads * head_width * dense_layers
    return ModelFlops(per_token, per_prediction, per_sequence, attention)


def peak_tflops(device_name: str | None, dtype: str, configured: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device for MFU: `configured` if > 0, else the table for bf16/fp16 on
    a known GPU, else None (CPU, fp32, unknown GPU: no MFU is reported)."""
    if configured > 0:
        return float(configured)
    if device_name is None or dtype not in ("bf16", "fp16"):
        return None
    for marker, peak in PEAK_TFLOPS_16BIT:
        if marker in device_name:
            return peak
    return None
