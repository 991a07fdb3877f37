"""Exact attention shrink of a squeezed BERT attention block (SPEC 5, beyond the row squeeze).

A pruned row `d` of a projection outputs a constant, its bias `c_d` (the window mean at pruning,
trained on since). In one head with scale `s = 1/sqrt(head_size)` the score of query `i` and
key `j` is `s * sum_d q_d(i) k_d(j)`; split the head's dims `d` by which of Q and K kept them:

- Q kept, K kept (the set `S`): an ordinary score dim; both rows stay.
- K pruned (whatever Q): `k_d(j) = c^K_d` for every key, so `q_d(i) c^K_d` is constant over `j`.
  Softmax over `j` is unchanged by a per-query constant, with any additive or boolean padding
  mask, so the term drops, with the Q row when it was kept. (Its gradient in the masked model is
  exactly zero for the same reason: softmax gradients sum to zero over `j`.)
- Q pruned, K kept (the set `T`): `c^Q_d k_d(j) = c^Q_d (W_K[d] x_j + b_K[d])`. Summed over the
  head's `T`, this is `u_h . x_j + const` with `u_h = sum_{d in T_h} c^Q_d W_K[d]`: one extra score
  feature per head, query side the constant 1, key side `u_h . x_j`; the constant cancels.
  `u_h` is computed from the parameters (`c^Q`, `W_K[T]`) in every forward, so their gradients
  are the masked model's and training stays exact.

The value side: a pruned value row `d` is the constant `c^V_d` at every key, so head `h`'s output
dim `d` is `c^V_d * r_h(i)` with `r_h(i) = sum_j a_ij`, the sum of the head's attention weights.
attn_out then receives `sum_{d in Pv_h} W_O[:, d] c^V_d r_h(i) = w_h r_h(i)`. One extra value
feature per head, the constant 1, gives `r_h(i)` from the same attention call, and attn_out gets
one extra input column per head, `w_h = W_O[:, Pv_h] @ c^V[Pv_h]`, again computed from the
parameters in every forward. When the attention weights sum to one (eval, or attention dropout
0) `r_h = 1` and this is the fold of `W_O[:, d] c^V_d` into attn_out's bias; with attention
dropout it is still exact (dropout rescales each weight, `r_h` carries it), so the value is never
expanded back to full width.

Layout for fused attention: head `h` keeps `|S_h| + [T_h non-empty]` score dims and
`|Kv_h| + [Pv_h non-empty]` value dims. Every head is padded with zero columns to the layer's
score width `E` (Q and K) and value width `Ev` (V), each the most any head of the layer needs,
rounded up to a multiple of 8: zero columns add nothing to scores or outputs, so
`F.scaled_dot_product_attention` runs on dense `[B, H, L, E]` / `[B, H, L, Ev]` tensors, exactly.
The two widths differ where a layer lost more score dims than value dims (the common case deep in
a VP-pruned model: the score needs both Q and K to keep a dim); one width for both would make
the QKV GEMM compute zero rows (measured, BERT-base at 50%: 0.485 of the dense step's FLOPs with
one width, 0.462 with two). Flash kernels want equal Q/K/V widths (on the CPU unequal ones fall
to SDPA's math path), so where no attention dropout is drawn (eval, or
p = 0) the narrower of q/k and v is padded with zero columns to the wider one for the SDPA call
(exact; one pad op each); with attention dropout the CPU runs the math path whatever the widths
and CUDA's memory-efficient kernel takes unequal widths. `widths="equal"` builds the older
layout, one width for Q, K and V (compact exports written before the split record no widths and
load with it). A head with no score dim left has all-zero queries and keys: every valid key
scores the same and the head attends uniformly, as the masked model's does (its scores are
constant per query there too).

Q, K (with `u_h`) and V come from one GEMM: the kept rows of the three projections, the `u_h` and
one zero row are concatenated and gathered (`index_select`) into the zero-padded weight
`[H*(2E + Ev), hidden]` in head order (head `h`: its `E` query, `E` key and `Ev` value rows;
every padding slot reads the zero row), so the GEMM output, viewed `[B, H, L, 2E + Ev]`, is the
attention input with no scatter of activations: q, k and v are one split of it, at any two
widths (Q | K | V blocks, the order before, needed a split, a permute and an unbind when the
widths differ, 3 more ops forward and backward); the bias likewise, from the kept
biases and the constants 0 and 1. attn_out reads the padded context through a weight gathered the
same way along its columns. A gather is two ops (concatenation, `index_select`) where a scatter
into zeros is three, and its backward one (`index_select_backward`) where the scatter's is two;
each source row lands in one slot, so its gradient is that slot's, exactly. Where no
dropout stands between attn_out and the residual add (eval, or hidden dropout 0), attn_out's kept
rows are added straight into `residual + bias` (`index_add`): no full-width output is built.

Self-contained (torch only), so a compact export can bundle it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (EvalCached, add_kept_rows_to_residual, cast_to, dropout_idle, expand_kept_rows, gemm_padding,
                     padded_weight, unpadded)

PAD_MULTIPLE = 8
# The head-width rule new blocks are built with when none is given (`attention_layout`'s `widths`):
# "split" (score and value widths each the least the heads need) or "equal" (one width). Process-wide,
# as the GEMM padding switches in `layers`; `launch/bench_squeeze.py --head-widths` sets it.
HEAD_WIDTHS = "split"


class _Projection(nn.Module):
    """Holder of one projection's squeezed tensors, under the projection's usual module name.

    `weight` is what the token GEMM reads; the extra tensors (the collapsed query constants, the
    `T` rows of the key, the folded value constants, attn_out's folded columns) feed the per-head
    features. `mask` is the pruning mask of the full-size projection (True = kept), for exports.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], mask: torch.Tensor):
        super().__init__()
        for name, tensor in tensors.items():
            if tensor.numel() == 0:  # ZeRO-3 cannot gather zero-size parameters: hold them as buffers
                self.register_buffer(name, tensor, persistent=True)
            else:
                setattr(self, name, nn.Parameter(tensor))
        self.register_buffer("mask", mask.to(torch.bool), persistent=True)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in ("weight", "bias") if hasattr(self, n))


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _indices(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask, as_tuple=False).flatten()


def attention_layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                     widths: str | tuple[int, int] | None = None) -> dict:
    """Index sets and padded slots of the shrunk attention, a pure function of the three masks
    and `widths`: "split" or None (the score and value widths each the least the heads need, a
    multiple of 8), "equal" (one width for both, the larger) or an explicit `(E, Ev)` (what a
    compact export recorded; each at least what the heads need).

    Returns (all int64 on the CPU unless noted): `S`, `T`, `kept_v`, `pruned_v` (full-size row
    indices), `E`, `Ev` (padded widths), `q_slots`, `k_slots` [|S|] and `u_slots` [#heads with T]
    (rows of the fused QKV weight), `v_slots` [|kept_v|], `one_v_slots` [#heads with pruned V],
    `t_heads` [|T|] and `pv_heads` [|pruned_v|] (rank of each row's head among those heads),
    `qkv_base` float [R] (the constant-1 features), `value_offset` (first value row of the fused
    weight; the context is `[..., H*Ev]` with head `h` at `h*Ev`).
    """
    # CPU even inside `from_pretrained`'s meta-device context: the layout is data, not weights.
    with torch.device("cpu"):
        return _layout(query, key, value, num_heads, widths)


def _head_widths(score_need: int, value_need: int, widths) -> tuple[int, int]:
    """(E, Ev) for the widths the heads need (see `attention_layout`)."""
    if widths is None or widths == "split":
        return _round_up(score_need, PAD_MULTIPLE), _round_up(value_need, PAD_MULTIPLE)
    if widths == "equal":
        width = _round_up(max(score_need, value_need), PAD_MULTIPLE)
        return width, width
    if isinstance(widths, str):
        raise ValueError(f"head widths {widths!r}: expected 'split', 'equal' or (score, value)")
    E, Ev = (int(w) for w in widths)
    if E < max(score_need, 1) or Ev < max(value_need, 1):
        raise ValueError(f"head widths {(E, Ev)} are below what the masks need: {score_need} score, "
                         f"{value_need} value dims")
    return E, Ev


def _layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, widths=None) -> dict:
    query, key, value = query.cpu().bool(), key.cpu().bool(), value.cpu().bool()
    head_size = query.numel() // num_heads
    head = torch.arange(query.numel()) // head_size
    score, collapsed = query & key, ~query & key
    score_count = torch.bincount(head[score], minlength=num_heads)
    has_t = torch.bincount(head[collapsed], minlength=num_heads) > 0
    value_count = torch.bincount(head[value], minlength=num_heads)
    has_pv = torch.bincount(head[~value], minlength=num_heads) > 0
    E, Ev = _head_widths(int((score_count + has_t).max()), int((value_count + has_pv).max()), widths)

    def slots(mask: torch.Tensor, width: int) -> torch.Tensor:
        rows = _indices(mask)
        first = torch.cumsum(torch.bincount(head[rows], minlength=num_heads), 0) - torch.bincount(
            head[rows], minlength=num_heads)
        rank = torch.arange(rows.numel()) - first[head[rows]]
        return head[rows] * width + rank

    heads = torch.arange(num_heads)
    q_slots = slots(score, E)
    t_head_list, pv_head_list = heads[has_t], heads[has_pv]
    u_slots = num_heads * E + t_head_list * E + score_count[t_head_list]
    value_offset = 2 * num_heads * E
    v_slots = value_offset + slots(value, Ev)
    one_v_slots = value_offset + pv_head_list * Ev + value_count[pv_head_list]
    base = torch.zeros(value_offset + num_heads * Ev)
    base[t_head_list * E + score_count[t_head_list]] = 1.0  # query side of the u_h feature
    base[one_v_slots] = 1.0                                 # the constant-1 value feature
    rank_of = torch.full((num_heads,), -1, dtype=torch.long)
    rank_of[t_head_list] = torch.arange(t_head_list.numel())
    t_heads = rank_of[head[collapsed]]
    rank_of = torch.full((num_heads,), -1, dtype=torch.long)
    rank_of[pv_head_list] = torch.arange(pv_head_list.numel())
    return {"S": _indices(score), "T": _indices(collapsed), "kept_v": _indices(value), "pruned_v": _indices(~value),
            "E": E, "Ev": Ev, "q_slots": q_slots, "k_slots": num_heads * E + q_slots, "u_slots": u_slots,
            "v_slots": v_slots, "one_v_slots": one_v_slots, "t_heads": t_heads,
            "pv_heads": rank_of[head[~value]], "qkv_base": base, "value_offset": value_offset}


def _gathers(layout: dict, out_rows: int, hidden: int, num_heads: int, dtype: torch.dtype) -> dict:
    """The gather indices (and the zero / constant sources they read) that build the padded weights
    from the parameters (see the module docstring):

    - `qkv_gather` [R]: row `r` of the fused QKV weight is row `qkv_gather[r]` of
      `cat([query.weight, key.weight, u, value.weight, zero_row])`. The fused weight is in head
      order: head `h` owns rows `[h*(2E+Ev), (h+1)*(2E+Ev))`, its `E` query rows, `E` key rows and
      `Ev` value rows, so the GEMM output is `[..., H, 2E+Ev]` and one split along the last dim
      gives q, k and v at any two widths (`layout`'s slots, whose rows are Q | K | V blocks as the
      state dict's `qkv_rows` records them, are mapped to it by `_head_order`);
    - `qkv_bias_gather` [R]: its bias element `r` is element `qkv_bias_gather[r]` of
      `cat([query.bias, key.bias, value.bias, bias_constants])`, `bias_constants` = (0, 1): the
      `u_h` rows' key side reads 0, the constant-1 features (`qkv_base`) read 1;
    - `out_gather` [H*Ev]: column `c` of attn_out's weight is column `out_gather[c]` of
      `cat([dense.weight, w, zero_column], dim=1)`.
    """
    rows, order = layout["qkv_base"].numel(), _head_order(layout, num_heads)
    sources = order[torch.cat([layout["q_slots"], layout["k_slots"], layout["u_slots"], layout["v_slots"]])]
    qkv_gather = torch.full((rows,), sources.numel(), dtype=torch.long)  # padding: the zero row
    qkv_gather[sources] = torch.arange(sources.numel())
    biased = order[torch.cat([layout["q_slots"], layout["k_slots"], layout["v_slots"]])]
    zero, one = biased.numel(), biased.numel() + 1
    qkv_bias_gather = torch.full((rows,), zero, dtype=torch.long)
    qkv_bias_gather[order[layout["qkv_base"] != 0]] = one
    qkv_bias_gather[biased] = torch.arange(biased.numel())
    columns = torch.cat([layout["v_slots"], layout["one_v_slots"]]) - layout["value_offset"]
    out_gather = torch.full((num_heads * layout["Ev"],), columns.numel(), dtype=torch.long)
    out_gather[columns] = torch.arange(columns.numel())
    return {"qkv_gather": qkv_gather, "qkv_bias_gather": qkv_bias_gather, "out_gather": out_gather,
            "zero_row": torch.zeros(1, hidden, dtype=dtype), "zero_column": torch.zeros(out_rows, 1, dtype=dtype),
            "bias_constants": torch.tensor([0.0, 1.0], dtype=dtype)}


def _head_order(layout: dict, num_heads: int) -> torch.Tensor:
    """[R]: for each row of `layout`'s blocked fused weight (all heads' Q rows, then K, then V),
    its row in head order (head `h`: its Q rows, K rows, V rows)."""
    E, Ev = layout["E"], layout["Ev"]
    start = torch.arange(num_heads).unsqueeze(1) * (2 * E + Ev)
    query = (start + torch.arange(E)).flatten()
    return torch.cat([query, query + E, (start + 2 * E + torch.arange(Ev)).flatten()])


def _onehot(group: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, n] float: column `i` is 1 at row `group[i]` (sums rows of a group by a matmul)."""
    onehot = torch.zeros(groups, group.numel(), device="cpu")
    onehot[group, torch.arange(group.numel(), device="cpu")] = 1.0
    return onehot


class _SelfHolder(nn.Module):
    """`attention.self`: holds query, key, value and the attention-probability dropout under their
    usual names (`dropout.p` is read in every forward, as by the stock block)."""

    def __init__(self, query: _Projection, key: _Projection, value: _Projection, dropout: float):
        super().__init__()
        self.query, self.key, self.value = query, key, value
        self.dropout = nn.Dropout(dropout)


class _OutputHolder(nn.Module):
    """`attention.output`: dense (attn_out), LayerNorm and dropout under their usual names."""

    def __init__(self, dense: _Projection, layer_norm: nn.Module, dropout: nn.Module):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = dense, layer_norm, dropout


class SqueezedBertAttention(EvalCached):
    """Drop-in for a BERT/RoBERTa self-attention block (`BertAttention`) with the exact shrink.

    Parameter names stay those of the full block (`self.query.weight`, `output.dense.bias`, ...),
    plus `self.query.collapsed_bias` (c^Q of T), `self.key.collapsed_weight` (W_K[T]),
    `self.value.folded_bias` (c^V of pruned value rows) and `output.dense.folded_weight`
    (W_O[kept rows, pruned value cols]). forward(hidden_states [B, L, hidden], attention_mask as
    the stock block gets it: bool (SDPA) or additive float (eager) [B, 1, L, L], or None)
    -> (attention output [B, L, hidden], attention weights or None).

    In eval without autograd the fused QKV weight and bias, attn_out's weight and its kept bias
    rows are cached (see `vp_dist.squeeze.layers.EvalCached`; the key includes the autocast state
    and the fp32 matmul precision, which the fused weight's products depend on), and the forward
    runs fewer, exactly equal ops: no weight builds, no no-op casts, no eval dropout.

    The layout buffers (`qkv_rows`, `qkv_base`, `out_cols`, `out_rows`, `t_onehot`, `pv_onehot`) are
    in the state dict for self-contained exports, but they are a function of the masks and head
    widths this block was built with: loading a state dict keeps the block's own (a checkpoint
    written under another width rule loads; one written for other masks is refused). `qkv_rows`,
    `qkv_base` and `out_cols` record the layout in Q | K | V block order; the forward reads gather
    indices derived from the same masks and widths (`_gathers`, not saved).
    """

    LAYOUT_BUFFERS = ("qkv_rows", "qkv_base", "out_cols", "out_rows", "t_onehot", "pv_onehot")

    def __init__(self, config, masks: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                 layer_norm: nn.Module, hidden_dropout: nn.Module, attention_dropout: float,
                 widths: str | tuple[int, int] | None = None):
        """masks: "query", "key", "value", "attn_out" -> bool kept [d_out] of the full block.
        tensors: the full block's weights and biases, "query.weight", ..., "attn_out.bias".
        widths: the head widths rule of `attention_layout` (None: the module's `HEAD_WIDTHS`)."""
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.num_heads
        layout = attention_layout(masks["query"], masks["key"], masks["value"], self.num_heads,
                                  HEAD_WIDTHS if widths is None else widths)
        self.E, self.Ev, self.value_offset = layout["E"], layout["Ev"], layout["value_offset"]
        out_rows = _indices(masks["attn_out"].cpu().bool())
        self.attn_out_full = out_rows.numel() == masks["attn_out"].numel()
        device = tensors["query.weight"].device
        S, T, kept_v, pruned_v = (layout[k].to(device) for k in ("S", "T", "kept_v", "pruned_v"))
        o_rows = out_rows.to(device)
        t = {k: v.detach() for k, v in tensors.items()}
        query = _Projection({"weight": t["query.weight"][S].clone(), "bias": t["query.bias"][S].clone(),
                             "collapsed_bias": t["query.bias"][T].clone()}, masks["query"])
        key = _Projection({"weight": t["key.weight"][S].clone(), "bias": t["key.bias"][S].clone(),
                           "collapsed_weight": t["key.weight"][T].clone()}, masks["key"])
        value = _Projection({"weight": t["value.weight"][kept_v].clone(), "bias": t["value.bias"][kept_v].clone(),
                             "folded_bias": t["value.bias"][pruned_v].clone()}, masks["value"])
        out_weight = t["attn_out.weight"][o_rows]
        dense = _Projection({"weight": out_weight[:, kept_v].clone(), "folded_weight": out_weight[:, pruned_v].clone(),
                             "bias": t["attn_out.bias"].clone()}, masks["attn_out"])
        self.self = _SelfHolder(query, key, value, float(attention_dropout))
        self.output = _OutputHolder(dense, layer_norm, hidden_dropout)
        self.register_buffer("qkv_rows", torch.cat([layout["q_slots"], layout["k_slots"], layout["u_slots"],
                                                    layout["v_slots"]]).to(device), persistent=True)
        self.register_buffer("qkv_base", layout["qkv_base"].to(device), persistent=True)
        self.register_buffer("out_cols", torch.cat([layout["v_slots"], layout["one_v_slots"]]).to(device)
                             - self.value_offset, persistent=True)
        self.register_buffer("out_rows", o_rows, persistent=True)
        self.register_buffer("t_onehot", _onehot(layout["t_heads"], layout["u_slots"].numel()).to(device),
                             persistent=True)
        self.register_buffer("pv_onehot", _onehot(layout["pv_heads"], layout["one_v_slots"].numel()).to(device),
                             persistent=True)
        # What the forward reads (`_gather_tensors`): a function of the layout above, rebuilt with every
        # block, so neither saved nor a buffer (`from_pretrained` builds blocks with buffers on the meta
        # device and leaves unsaved ones uninitialised); moved to the weights' device and dtype on use.
        with torch.device("cpu"):
            self._gathers = _gathers(layout, out_rows.numel(), config.hidden_size, self.num_heads,
                                     tensors["query.weight"].dtype)

    # ------------------------------------------------------------------ weights in head layout
    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [H*(2E + Ev), hidden], bias) of the one QKV GEMM in head order, built from the parameters."""
        q, k, v = self.self.query, self.self.key, self.self.value
        dtype, gathers = q.weight.dtype, self._gather_tensors()
        u = torch.mm(cast_to(self.t_onehot, dtype) * q.collapsed_bias, k.collapsed_weight)  # [heads with T, hidden]
        weight = torch.cat([q.weight, k.weight, u, v.weight, gathers["zero_row"]]).index_select(
            0, gathers["qkv_gather"])
        bias = torch.cat([q.bias, k.bias, v.bias, gathers["bias_constants"]]).index_select(
            0, gathers["qkv_bias_gather"])
        return weight, bias

    def out_weight(self, cached: bool = False) -> torch.Tensor:
        """attn_out's weight [kept rows, H*Ev] over the padded context, with the w_h columns (and
        zero rows up to a multiple of 8 where `layers.gemm_padding` pads: `cached`, on a GPU)."""
        dense, gathers = self.output.dense, self._gather_tensors()
        w = F.linear(dense.folded_weight * self.self.value.folded_bias, cast_to(self.pv_onehot, dense.weight.dtype))
        weight = torch.cat([dense.weight, w, gathers["zero_column"]], dim=1).index_select(1, gathers["out_gather"])
        return padded_weight(weight, None, gemm_padding(weight.shape[0], weight, cached))[0]

    def _gather_tensors(self) -> dict[str, torch.Tensor]:
        """`_gathers`' tensors on the weights' device, the zero and constant sources in their dtype
        (converted once, after the block moved or was cast: later forwards run no conversion)."""
        reference = self.self.query.weight
        gathers = self._gathers
        if gathers["zero_row"].device != reference.device or gathers["zero_row"].dtype != reference.dtype:
            gathers = {name: value.to(reference.device, reference.dtype if value.is_floating_point() else None)
                       for name, value in gathers.items()}
            self._gathers = gathers
        return gathers

    def qkv_row_counts(self) -> tuple[int, int]:
        """(rows the heads need, rows the fused QKV GEMM computes): the kept Q, K and V rows of the
        score and value dims, plus each head's `u_h` feature (key side and its constant-1 query side)
        and its constant-1 value feature, against `H * (2E + Ev)`, every head padded to the layer's
        widths. The difference is the zero rows the one-width-per-layer layout multiplies."""
        return self.qkv_rows.numel() + int((self.qkv_base != 0).sum()), self.qkv_base.numel()

    # ------------------------------------------------------------------ forward
    def matmul_flops(self) -> tuple[int, int]:
        """Forward FLOPs of the matmuls this block runs in training (2 per multiply-add, padded widths
        included): (per token: the fused QKV GEMM and attn_out's, per (query, key) pair: scores and
        context; at the wider of the two widths where SDPA runs without attention dropout, see `forward`)."""
        hidden = self.config.hidden_size
        per_token = 2 * self.num_heads * (2 * self.E + self.Ev) * hidden + 2 * self.out_rows.numel() * self.num_heads * self.Ev
        padded = self.self.dropout.p == 0 and getattr(self.config, "_attn_implementation", "sdpa") != "eager"
        pair_widths = 2 * max(self.E, self.Ev) if padded else self.E + self.Ev
        return per_token, 2 * self.num_heads * pair_widths

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The tensors derived from the parameters: built in every training forward (gradients stay
        # exact), cached from one eval forward without autograd to the next (`EvalCached`).
        cached = self.eval_cached(self._eval_sources, lambda: self._derived_tensors(True), self._eval_extra_key)
        qkv_weight, qkv_bias, out_weight = cached if cached is not None else self._derived_tensors(False)
        batch, length = hidden_states.shape[:2]
        heads, E, Ev = self.num_heads, self.E, self.Ev
        # Head order (`_gathers`): q, k, v [B, H, L, width] are three views of the GEMM output.
        qkv = F.linear(hidden_states, qkv_weight, qkv_bias).view(batch, length, heads, 2 * E + Ev).transpose(1, 2)
        q, k, v = qkv.split([E, E, Ev], dim=-1)
        dropout = self.self.dropout.p if self.training else 0.0
        scale = self.head_size ** -0.5
        weights = None
        if getattr(self.config, "_attn_implementation", "sdpa") == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) * scale
            if attention_mask is not None:
                scores = scores + attention_mask
            weights = F.softmax(scores, dim=-1)
            if self.training:
                weights = F.dropout(weights, p=dropout)
            context = torch.matmul(weights, v)
        else:
            if E != Ev and dropout == 0.0:  # flash kernels want equal widths: zero columns, exact
                if E < Ev:
                    q, k = F.pad(q, (0, Ev - E)), F.pad(k, (0, Ev - E))
                else:
                    v = F.pad(v, (0, E - Ev))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout,
                                                     scale=scale)
            context = unpadded(context, Ev)
        context = context.transpose(1, 2).reshape(batch, length, heads * Ev)
        hidden_dropout = self.output.dropout
        product = unpadded(F.linear(context, out_weight), self.out_rows.numel())
        if dropout_idle(hidden_dropout) and not self.attn_out_full and not torch.onnx.is_in_onnx_export():
            # The expand fused with the residual add (no dropout between them to keep exact): the
            # kept rows' products are added in place into residual + bias, no full-width output.
            fused = add_kept_rows_to_residual(hidden_states, self.output.dense.bias, product, self.out_rows)
            return self.output.LayerNorm(fused), weights
        bias = cast_to(self.output.dense.bias, product.dtype)
        out = product + bias if self.attn_out_full else expand_kept_rows(bias, product, self.out_rows)
        if type(hidden_dropout) is not nn.Dropout or hidden_dropout.training:  # nn.Dropout in eval: identity
            out = hidden_dropout(out)
        return self.output.LayerNorm(out + hidden_states), weights

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        projections = {"self.query": self.self.query, "self.key": self.self.key, "self.value": self.self.value,
                       "output.dense": self.output.dense}
        for name, projection in projections.items():
            mask = state_dict.get(f"{prefix}{name}.mask")
            if mask is not None and not torch.equal(mask.cpu().bool(), projection.mask.cpu().bool()):
                error_msgs.append(f"{prefix}{name}.mask: the checkpoint's attention block was squeezed with "
                                  "other masks than this one")
        for name in self.LAYOUT_BUFFERS:  # derived from the masks (checked above) and the head widths
            if prefix + name in state_dict:
                state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ eval: cached derived tensors
    def _eval_sources(self) -> tuple[torch.Tensor, ...]:
        q, k, v, o = self.self.query, self.self.key, self.self.value, self.output.dense
        return (q.weight, q.bias, q.collapsed_bias, k.weight, k.bias, k.collapsed_weight, v.weight, v.bias,
                v.folded_bias, o.weight, o.folded_weight, o.bias, self.out_rows, self.t_onehot, self.pv_onehot)

    def _frozen_build(self):
        return self._derived_tensors(True)

    def _eval_extra_key(self) -> tuple:
        device = self.self.query.weight.device.type
        return (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                torch.get_float32_matmul_precision())

    def _derived_tensors(self, cached: bool) -> tuple[torch.Tensor, ...]:
        """(fused QKV weight, its bias, attn_out's weight), from the parameters; `cached`: built once
        (eval cache, frozen), so attn_out's rows are padded for the GEMM where that pays."""
        weight, bias = self.fused_qkv()
        return weight, bias, self.out_weight(cached)

    # ------------------------------------------------------------------ back to full size
    @torch.no_grad()
    def expanded(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Full-size (weight, bias, kept mask) of query, key, value and attn_out, on the CPU.

        The same function as this block (see the module docstring): Q rows outside `S` and K rows
        outside `S` and `T` are zero (their terms were per-query constants); K's `T` rows get a
        zero bias (a constant); Q's `T` rows hold c^Q as bias; V's pruned rows hold c^V as bias;
        attn_out gets its folded columns back.
        """
        layout = attention_layout(self.self.query.mask, self.self.key.mask, self.self.value.mask, self.num_heads)
        hidden = self.config.hidden_size
        q, k, v, o = self.self.query, self.self.key, self.self.value, self.output.dense

        def full(rows_values: list, d_in: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
            weight = torch.zeros(hidden, d_in, dtype=dtype)
            bias = torch.zeros(hidden, dtype=dtype)
            for rows, w, b in rows_values:
                if w is not None:
                    weight[rows] = w.detach().cpu()
                bias[rows] = b.detach().cpu()
            return weight, bias

        dtype = q.weight.dtype
        S, T = layout["S"], layout["T"]
        out = {"query": (*full([(S, q.weight, q.bias), (T, None, q.collapsed_bias)], hidden, dtype), q.mask.cpu()),
               "key": (*full([(S, k.weight, k.bias), (T, k.collapsed_weight, torch.zeros(T.numel(), dtype=dtype))],
                             hidden, dtype), k.mask.cpu()),
               "value": (*full([(layout["kept_v"], v.weight, v.bias), (layout["pruned_v"], None, v.folded_bias)],
                               hidden, dtype), v.mask.cpu())}
        o_weight = torch.zeros(hidden, hidden, dtype=dtype)
        rows = self.out_rows.cpu().unsqueeze(1)
        o_weight[rows, layout["kept_v"].unsqueeze(0)] = o.weight.detach().cpu()
        o_weight[rows, layout["pruned_v"].unsqueeze(0)] = o.folded_weight.detach().cpu()
        out["attn_out"] = (o_weight, o.bias.detach().cpu().clone(), o.mask.cpu())
        return out
