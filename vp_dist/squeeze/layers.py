"""`SqueezedLinear`: a linear layer that stores only its kept rows (SPEC 5).

Self-contained (imports torch only), so a compact export can bundle it; see
`vp_dist.export.SELF_CONTAINED_MODULES`.

`EvalCached` (the base of the squeezed modules) keeps tensors derived from a module's parameters
(a gathered bias, a fused weight) from one eval forward to the next, so that eval does not rebuild
them, one small kernel each, in every call. The cache is read only in eval mode with autograd off,
outside torch.compile / TorchScript tracing / ONNX export: training and every traced path compute
the derived tensors from the parameters as before (gradients stay exact, graphs unchanged).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import TensorWeakRef

_CACHE = "_eval_cache"
_FROZEN = "_frozen_eval_tensors"


class EvalCached(nn.Module):
    """Base of modules whose eval forward may reuse tensors derived from their own tensors.

    `eval_cached(sources, build, extra)` returns `build()`'s value, rebuilt whenever any tensor
    `sources()` returns changed: another object, an in-place update (`_version`: optimizer steps, `copy_`,
    `load_state_dict`), other storage (`data_ptr`), dtype, device or shape (`.to(...)`, `.half()`),
    or `extra()` (e.g. the autocast state) differs. The three are callables, called only where the
    cache is usable, so compiled graphs never see them. It returns None where the cache must not be used
    (training, autograd on, compiling, tracing, ONNX export, CUDA graph capture,
    `cache_eval_tensors = False`, DeepSpeed ZeRO-3 parameters), and such a forward (outside
    compilation and capture) drops the cache. Writes that bypass the version counter
    (`param.data.copy_(...)`, as DeepSpeed's optimizers do) are not seen while the module stays in
    eval mode with autograd off; `train()`, any training or autograd forward, or `clear_eval_cache()`
    drops the cache. The cache lives in the instance `__dict__`: not a buffer, not in the state dict,
    not pickled, not deep-copied.

    `freeze_eval_tensors(model)` goes one step further for serving: each module's derived tensors
    are built once and then used by every eval forward without autograd, also under
    `torch.compile` and CUDA-graph capture (a captured graph or compiled kernel then reads them
    instead of rebuilding them in every call). Frozen values do not follow later parameter
    changes: `train()`, `unfreeze_eval_tensors(model)` or `clear_eval_cache()` thaws them (and
    frees them: a CUDA graph captured while frozen must not be replayed after that).
    """

    cache_eval_tensors: bool = True

    def _eval_cache_usable(self) -> bool:
        return (self.cache_eval_tensors and not self.training and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not torch.onnx.is_in_onnx_export())

    def eval_cached(self, sources, build, extra=None):
        frozen = self.__dict__.get(_FROZEN)
        if frozen is not None and not self.training and not torch.is_grad_enabled():
            return frozen
        if torch.compiler.is_compiling():
            return None
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # CUDA graph capture: the derived tensors are computed inside the graph, so replays
            # follow later parameter updates and never read a cache entry that was since dropped
            # (nor a cache filled with values no kernel has computed yet).
            return None
        if not self._eval_cache_usable():
            self.__dict__.pop(_CACHE, None)
            return None
        sources = sources()
        try:
            state = tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in sources)
        except RuntimeError:  # inference tensors have no version counter
            return None
        if any(hasattr(t, "ds_id") for t in sources):  # ZeRO-3: gathered and released around each forward
            return None
        key = (state, extra() if extra is not None else None)
        entry = self.__dict__.get(_CACHE)
        if entry is not None and entry[1] == key and all(ref() is t for ref, t in zip(entry[0], sources)):
            return entry[2]
        values = build()
        self.__dict__[_CACHE] = ([TensorWeakRef(t) for t in sources], key, values)
        return values

    def clear_eval_cache(self) -> None:
        self.__dict__.pop(_CACHE, None)
        self.__dict__.pop(_FROZEN, None)

    def freeze_eval_tensors(self) -> None:
        """Build the derived tensors now (no autograd) and use them in every later eval forward
        without autograd, compiled and captured ones included, until thawed (see the class)."""
        self.__dict__.pop(_FROZEN, None)
        with torch.no_grad():
            self.__dict__[_FROZEN] = self._frozen_build()

    def _frozen_build(self):
        raise NotImplementedError

    def train(self, mode: bool = True):
        if mode:
            self.clear_eval_cache()
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(_CACHE, None)
        state.pop(_FROZEN, None)
        return state


def freeze_eval_tensors(model: nn.Module) -> int:
    """`EvalCached.freeze_eval_tensors` on every squeezed module of `model` (put in eval mode):
    for inference, where the weights no longer change. Returns how many modules were frozen."""
    model.eval()
    modules = [m for m in model.modules() if isinstance(m, EvalCached)]
    for module in modules:
        module.freeze_eval_tensors()
    return len(modules)


def unfreeze_eval_tensors(model: nn.Module) -> None:
    """Undo `freeze_eval_tensors`: every squeezed module of `model` rebuilds its derived tensors again."""
    for module in model.modules():
        if isinstance(module, EvalCached):
            module.clear_eval_cache()


# GEMM width padding (exact). Squeezed widths are whatever the global selection left (e.g. 2037
# FFN rows); a bf16/fp16 GEMM whose width is not a multiple of 8 elements (16 bytes) falls back to
# slow unaligned kernels on NVIDIA GPUs (measured: `launch/bench_gemm_align.py`, the README's GPU
# section). On the devices in `GEMM_PAD_DEVICES` the squeezed layers therefore multiply by weights
# padded with zero rows or columns up to a multiple of `GEMM_PAD_MULTIPLE`: zero rows add output
# columns the layer then drops (or, FFN-in, zero activations that FFN-out's zero columns ignore),
# so outputs and every kept parameter's gradient are the unpadded layer's (to float
# re-association); the parameters keep their exact shapes (state dicts, checkpoints, the engine
# rebuild and the optimizer state are unchanged). The padded weight is a copy made in the forward
# (cached in eval, see `EvalCached`). Off on the CPU, where unaligned widths cost nothing measurable.
GEMM_PAD_MULTIPLE = 8
GEMM_PAD_DEVICES = {"cuda"}


def gemm_padding(width: int, like: torch.Tensor) -> int:
    """Zero rows/columns that round `width` up to a multiple of `GEMM_PAD_MULTIPLE`, where the
    tensor `like` lives on a device in `GEMM_PAD_DEVICES`; else 0."""
    if like.device.type not in GEMM_PAD_DEVICES or GEMM_PAD_MULTIPLE <= 1:
        return 0
    return -width % GEMM_PAD_MULTIPLE


def padded_weight(weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 0, cols: int = 0):
    """(weight with `rows` zero rows and `cols` zero columns appended, bias with `rows` zeros)."""
    if rows or cols:
        weight = F.pad(weight, (0, cols, 0, rows))
    if bias is not None and rows:
        bias = F.pad(bias, (0, rows))
    return weight, bias


class PaddedLinear(nn.Linear, EvalCached):
    """`nn.Linear` (same parameters, same state dict) for the two matrices of a folded FFN, whose
    shared inner width is the count of kept FFN rows:

    - as FFN-in, its output is padded with zero columns to a multiple of `GEMM_PAD_MULTIPLE` where
      padding is on (`GEMM_PAD_DEVICES`): the activation maps them to act(0), finite;
    - as FFN-out (or any layer after it), an input wider than `in_features` is read through zero
      weight columns, so those padded activations contribute nothing.
    Where padding is off it is `nn.Linear` exactly. The padded weight is cached in eval (`EvalCached`).
    """

    def _eval_sources(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.bias

    def _padded(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return padded_weight(self.weight, self.bias, gemm_padding(self.out_features, self.weight),
                             width - self.in_features)

    def _frozen_build(self):
        widths = {self.in_features, self.in_features + gemm_padding(self.in_features, self.weight)}
        return {width: self._padded(width) for width in widths}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not gemm_padding(self.out_features, x) and x.shape[-1] == self.in_features:
            return F.linear(x, self.weight, self.bias)
        cached = self.eval_cached(self._eval_sources, lambda: self._padded(x.shape[-1]), lambda: x.shape[-1])
        if isinstance(cached, dict):  # frozen: one entry per input width
            cached = cached.get(x.shape[-1])
        return F.linear(x, *(cached if cached is not None else self._padded(x.shape[-1])))


def expand_kept_rows(bias: torch.Tensor, kept: torch.Tensor, kept_rows: torch.Tensor) -> torch.Tensor:
    """The full-width output of a row-squeezed layer: `bias` [out] everywhere (cast to `kept`'s
    dtype, as under autocast), the kept rows' values `kept` [..., k] at `kept_rows` [k], written
    with a deterministic `index_copy`. Static shapes: compiles without graph breaks."""
    bias = bias if bias.dtype == kept.dtype else bias.to(kept.dtype)
    return bias.expand(*kept.shape[:-1], bias.shape[0]).index_copy(-1, kept_rows, kept)


class SqueezedLinear(EvalCached):
    """Linear layer with only its kept rows stored densely.

    weight [k, in_features], bias [out_features], kept_rows int64 [k] (sorted output positions).
    forward(x [..., in_features]) -> [..., out_features]: the bias everywhere, `x W^T + bias` at
    the kept rows. The kept rows are written with a deterministic `index_copy` (not an atomic
    `index_add`) into the bias, cast to the product's dtype: under `torch.autocast` (bf16, fp16)
    the output has the autocast dtype, exactly as `nn.Linear`'s would, and bf16/fp16 weights work.
    Shapes and indices are static, so the layer compiles without graph breaks. In eval without
    autograd `bias[kept_rows]` is cached (see `EvalCached`), no-op casts are skipped, and a layer
    that keeps every row returns the product itself (the same values as the `index_copy`).
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

    def _eval_sources(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.bias, self.kept_rows

    def _eval_tensors(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(weight, bias[kept_rows], both zero-padded as `forward` pads them for an input of
        `width` columns (default in_features); whether kept_rows is every row in order)."""
        rows = self.kept_rows
        every = rows.numel() == self.out_features and bool(
            torch.equal(rows, torch.arange(self.out_features, device=rows.device)))
        width = self.in_features if width is None else width
        weight, bias = padded_weight(self.weight, self.bias[rows], gemm_padding(rows.numel(), self.weight),
                                     width - self.in_features)
        return weight, bias, every

    def _frozen_build(self):
        """Per input width: in_features, and in_features padded (the input of a folded FFN-out)."""
        widths = {self.in_features, self.in_features + gemm_padding(self.in_features, self.weight)}
        return {width: self._eval_tensors(width) for width in widths}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = self.kept_rows.numel()
        cached = self.eval_cached(self._eval_sources, lambda: self._eval_tensors(x.shape[-1]),
                                  lambda: x.shape[-1])
        if isinstance(cached, dict):  # frozen: one entry per input width
            cached = cached.get(x.shape[-1])
        if cached is not None:
            kept = F.linear(x, cached[0], cached[1])
            kept = kept if kept.shape[-1] == count else kept[..., :count]
            if cached[2]:
                return kept
            return expand_kept_rows(self.bias, kept, self.kept_rows)
        weight, bias = padded_weight(self.weight, self.bias[self.kept_rows], gemm_padding(count, x),
                                     x.shape[-1] - self.in_features)
        kept = F.linear(x, weight, bias)
        kept = kept if kept.shape[-1] == count else kept[..., :count]
        if torch.onnx.is_in_onnx_export():
            return self._gathered(kept)
        return expand_kept_rows(self.bias, kept, self.kept_rows)

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
