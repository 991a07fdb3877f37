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
        without autograd, compiled and captured ones included, until thawed (see the class).
        Refused for DeepSpeed ZeRO-3 parameters: a rank holds only a partition of each outside
        the forward (freeze the module of a gathered or exported model instead)."""
        if any(hasattr(t, "ds_id") for t in self._eval_sources()):
            raise ValueError(f"{type(self).__name__}: cannot freeze eval tensors of ZeRO-3 partitioned "
                             "parameters; freeze a gathered copy (e.g. the compact export) instead")
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
# rebuild and the optimizer state are unchanged). The padded weight is a copy of the weight, so it
# is used where that copy is made once: the eval cache and frozen eval tensors (`EvalCached`).
# On the devices in `GEMM_PAD_UNCACHED` it pads in every forward too (training): on a launch-bound
# H200 training step the extra copies cost more than the aligned kernels saved (README, GPU
# section), so CUDA pads only where the copy is made once. Off on the CPU: there the FFN's GEMM
# pair alone ran 13-17% slower per row at odd widths (`bench_gemm_align.py`), but a whole BERT-base
# training step padded and not differed by less than its run-to-run spread (`bench_squeeze.py
# --gemm-pad always|off`, four pairs; the README's CPU table).
GEMM_PAD_MULTIPLE = 8
GEMM_PAD_DEVICES = {"cuda"}
GEMM_PAD_UNCACHED: set[str] = set()


def gemm_padding(width: int, like: torch.Tensor, cached: bool) -> int:
    """Zero rows/columns that round `width` up to a multiple of `GEMM_PAD_MULTIPLE`, where the
    tensor `like` lives on a device in `GEMM_PAD_DEVICES` and the padded weight is built once
    (`cached`) or the device is in `GEMM_PAD_UNCACHED`; else 0."""
    device = like.device.type
    if device not in GEMM_PAD_DEVICES or GEMM_PAD_MULTIPLE <= 1 or not (cached or device in GEMM_PAD_UNCACHED):
        return 0
    return -width % GEMM_PAD_MULTIPLE


def padded_weight(weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 0, cols: int = 0):
    """(weight with `rows` zero rows and `cols` zero columns appended, bias with `rows` zeros)."""
    if rows or cols:
        weight = F.pad(weight, (0, cols, 0, rows))
    if bias is not None and rows:
        bias = F.pad(bias, (0, rows))
    return weight, bias


def _input_widths(in_features: int, weight: torch.Tensor) -> set[int]:
    """The input widths a frozen layer may see: its own, and its own padded (a folded FFN-out)."""
    return {in_features, in_features + gemm_padding(in_features, weight, cached=True)}


class PaddedLinear(nn.Linear, EvalCached):
    """`nn.Linear` (same parameters, same state dict) for the two matrices of a folded FFN, whose
    shared inner width is the count of kept FFN rows:

    - as FFN-in, its output is padded with zero columns to a multiple of `GEMM_PAD_MULTIPLE` where
      padding is on (`gemm_padding`): the activation maps them to act(0), finite;
    - as FFN-out (or any layer after it), an input wider than `in_features` is read through zero
      weight columns, so those padded activations contribute nothing.
    Where padding is off it is `nn.Linear` exactly. The padded weight is cached in eval (`EvalCached`).
    """

    def _eval_sources(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.bias

    def _padded(self, width: int, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return padded_weight(self.weight, self.bias, gemm_padding(self.out_features, self.weight, cached),
                             width - self.in_features)

    def _frozen_build(self):
        return {width: self._padded(width, True) for width in _input_widths(self.in_features, self.weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        cached = self.eval_cached(self._eval_sources, lambda: self._padded(width, True), lambda: width)
        if isinstance(cached, dict):  # frozen: one entry per input width
            cached = cached.get(width)
        if cached is None:
            if width == self.in_features and not gemm_padding(self.out_features, x, cached=False):
                return F.linear(x, self.weight, self.bias)
            cached = self._padded(width, False)
        return F.linear(x, *cached)


def cast_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, without a (no-op) cast op where it already is: one op fewer per
    training forward, which counts on a launch-bound GPU step."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def unpadded(product: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` output columns of a GEMM whose weight had zero rows appended
    (`gemm_padding`); the product itself (no view op) where none were."""
    return product if product.shape[-1] == count else product[..., :count]


def dropout_idle(dropout: nn.Module) -> bool:
    """Whether `dropout` (a block's hidden dropout) is the identity now: a plain `nn.Dropout` in eval
    or with p = 0, so a row expand may be fused with the residual add after it."""
    return type(dropout) is nn.Dropout and (not dropout.training or dropout.p == 0)


def add_kept_rows_to_residual(residual: torch.Tensor, bias: torch.Tensor, product: torch.Tensor,
                              kept_rows: torch.Tensor) -> torch.Tensor:
    """`residual + expand_kept_rows(bias, product, kept_rows)` without the full-width expand: the
    kept rows' products added in place (`index_add_`) into the fresh sum `residual + bias` (the bias
    cast to `product`'s dtype, as under autocast; the sum in the residual's dtype). Exact to float
    rounding: the same sums in another order."""
    summed = residual + cast_to(bias, product.dtype)
    return summed.index_add_(-1, kept_rows, cast_to(product, summed.dtype))


def replace_module(model: nn.Module, name: str, module: nn.Module | nn.Parameter) -> None:
    """Put `module` (or a parameter) at the dotted `name` inside `model`, in place of what is there."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def expand_kept_rows(bias: torch.Tensor, product: torch.Tensor, kept_rows: torch.Tensor) -> torch.Tensor:
    """The full-width output of a row-squeezed layer: `bias` [out] everywhere (cast to `product`'s
    dtype, as under autocast), plus the kept rows' products `product` [..., k] (no bias) at
    `kept_rows` [k]. One `index_add` into the broadcast bias: the indices are distinct, so each
    output element gets one addend (deterministic; `torch.use_deterministic_algorithms` has a
    deterministic CUDA kernel for it too), and its backward is the bias gradient's sum plus one
    `index_select`. Static shapes: compiles without graph breaks."""
    bias = cast_to(bias, product.dtype)
    return bias.expand(*product.shape[:-1], bias.shape[0]).index_add(-1, kept_rows, product)


class SqueezedLinear(EvalCached):
    """Linear layer with only its kept rows stored densely.

    weight [k, in_features], bias [out_features], kept_rows int64 [k] (sorted output positions).
    forward(x [..., in_features]) -> [..., out_features]: the bias everywhere, plus `x W^T` at
    the kept rows (`expand_kept_rows`). Under `torch.autocast` (bf16, fp16) the output has the
    autocast dtype, exactly as `nn.Linear`'s would, and bf16/fp16 weights work. Shapes and indices
    are static, so the layer compiles without graph breaks. An input wider than `in_features` (a
    padded FFN activation, see `PaddedLinear`) is read through zero weight columns. In eval
    without autograd the (padded) weight is cached (see `EvalCached`), and a layer that keeps
    every row returns the product plus the bias (the same values as the `index_add`).
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
        return self.weight, self.kept_rows

    def _weight(self, width: int, cached: bool) -> torch.Tensor:
        """The weight, zero-padded as the GEMM wants it (rows: `gemm_padding`; columns: up to the input `width`)."""
        return padded_weight(self.weight, None, gemm_padding(self.kept_rows.numel(), self.weight, cached),
                             width - self.in_features)[0]

    def _eval_tensors(self, width: int) -> tuple[torch.Tensor, bool]:
        """(the padded weight for an input of `width` columns, whether kept_rows is every row in order)."""
        rows = self.kept_rows
        every = rows.numel() == self.out_features and bool(
            torch.equal(rows, torch.arange(self.out_features, device=rows.device)))
        return self._weight(width, True), every

    def _frozen_build(self):
        return {width: self._eval_tensors(width) for width in _input_widths(self.in_features, self.weight)}

    def kept_product(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(`x W^T` at the kept rows [..., k], no bias; whether the cached eval tensors say that
        kept_rows is every row in order)."""
        count, width = self.kept_rows.numel(), x.shape[-1]
        cached = self.eval_cached(self._eval_sources, lambda: self._eval_tensors(width), lambda: width)
        if isinstance(cached, dict):  # frozen: one entry per input width
            cached = cached.get(width)
        product = F.linear(x, cached[0] if cached is not None else self._weight(width, False))
        return unpadded(product, count), cached is not None and cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product, every = self.kept_product(x)
        if every:
            return product + cast_to(self.bias, product.dtype)
        if torch.onnx.is_in_onnx_export():
            return self._gathered(product)
        return expand_kept_rows(self.bias, product, self.kept_rows)

    def _gathered(self, product: torch.Tensor) -> torch.Tensor:
        """The same values as `expand_kept_rows` (bitwise: bias plus one addend), as a gather that
        ONNX exports with dynamic batch and sequence sizes: output j adds column source[j] of the
        products where row j was kept, zero where it was pruned. Used while exporting to ONNX only."""
        count = self.kept_rows.numel()
        source = torch.full((self.out_features,), count, dtype=torch.long, device=product.device)
        source = source.index_copy(0, self.kept_rows, torch.arange(count, device=product.device))
        padded = torch.cat([product, product.new_zeros(*product.shape[:-1], 1)], dim=-1)
        return self.bias.to(product.dtype) + padded.index_select(-1, source)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={self.weight.shape[0]}"


class ResidualExpandOutput(nn.Module):
    """Hugging Face's `BertOutput` (FFN-out's block: `LayerNorm(dropout(dense(x)) + residual)`) for
    a row-squeezed `dense` (`SqueezedLinear`), with the expand fused with the residual add where
    nothing stands between them: in eval, or in training with dropout 0, the kept rows' products
    are added in place into `residual + bias` (`index_add_` into that fresh sum), so no full-width
    output of `dense` is built or copied; exact to float rounding (the same sums in another order;
    under autocast the bias and products are added to the residual in its dtype rather than first
    rounded to the autocast dtype). With dropout drawn, under ONNX export, or when `dense` is
    anything else (e.g. a tensor-parallel shard), it computes the stock block's expression. The
    same children under the same names (`dense`, `LayerNorm`, `dropout`): the same parameters and
    state dict as the block it replaces (`fuse_residual_expand`).
    forward(hidden_states [..., d_in], input_tensor [..., d_out]) -> [..., d_out]."""

    def __init__(self, dense: nn.Module, layer_norm: nn.Module, dropout: nn.Module):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = dense, layer_norm, dropout

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        dense = self.dense
        if dropout_idle(self.dropout) and isinstance(dense, SqueezedLinear) and not torch.onnx.is_in_onnx_export():
            product, _ = dense.kept_product(hidden_states)
            return self.LayerNorm(add_kept_rows_to_residual(input_tensor, dense.bias, product, dense.kept_rows))
        return self.LayerNorm(self.dropout(dense(hidden_states)) + input_tensor)


def fuse_residual_expand(model: nn.Module, block: str) -> bool:
    """Replace `model`'s module `block` (a `BertOutput`-like block: exactly the children `dense`,
    `LayerNorm`, `dropout`, computing `LayerNorm(dropout(dense(x)) + residual)`) by a
    `ResidualExpandOutput` holding the same children, where its `dense` is a `SqueezedLinear`.
    Returns whether it did (False: no such block, already fused, or `dense` kept every row)."""
    try:
        module = model.get_submodule(block)
    except AttributeError:
        return False
    children = dict(module.named_children())
    if type(module) is ResidualExpandOutput or set(children) != {"dense", "LayerNorm", "dropout"} \
            or not isinstance(children["dense"], SqueezedLinear):
        return False
    fused = ResidualExpandOutput(children["dense"], children["LayerNorm"], children["dropout"])
    fused.train(module.training)
    replace_module(model, block, fused)
    return True
