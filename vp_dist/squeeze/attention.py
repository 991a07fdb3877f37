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

Head groups (`widths="grouped"`, optional): heads of one layer differ in what they need (deep in
a VP-pruned BERT-base one head keeps 2 score dims, another 22), and padding all of them to the
widest makes the QKV GEMM multiply zero rows. The grouped layout splits the heads into up to
`MAX_HEAD_GROUPS` groups, each padded to its own two widths (`head_groups`: the fewest fused rows,
a further group only where it saves `MIN_GROUP_SAVING` of them). The fused weight holds the groups
one after another; each group's slice of the GEMM output is one attention call, and the groups'
contexts are concatenated for attn_out (whose weight is gathered to the same column order). Exact
as the one-group layout is: the groups only reorder and pad whole heads. One difference in
training: with attention dropout each group's call draws its own dropout masks, so the draws are
the masked model's in distribution but not bit for bit under one seed, as one group's are.

Q, K (with `u_h`) and V come from one GEMM: the kept rows of the three projections, the `u_h` and
one zero row are concatenated and gathered (`index_select`) into the zero-padded weight
`[H*(2E + Ev), hidden]` in head order (head `h`: its `E` query, `E` key and `Ev` value rows;
every padding slot reads the zero row; with head groups, group by group, each head at its group's
widths), so the GEMM output, viewed `[B, H, L, 2E + Ev]`, is the
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

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (EvalCached, add_kept_rows_to_residual, cast_to, dropout_idle, expand_kept_rows, gemm_padding,
                     padded_weight, unpadded)

try:  # transformers 5 collects attention weights through hooks (`_record_attention_weights`)
    from transformers.utils.output_capturing import _active_collector as _OUTPUT_COLLECTOR
except ImportError:  # transformers 4 (the weights travel in the output tuples), or torch alone
    _OUTPUT_COLLECTOR = None

PAD_MULTIPLE = 8
# The head-width rule new blocks are built with when none is given (`attention_layout`'s `widths`):
# "split" (score and value widths each the least the heads need), "equal" (one width) or "grouped"
# (heads in up to MAX_HEAD_GROUPS groups, each with its own two widths). Process-wide, as the GEMM
# padding switches in `layers`; `launch/bench_squeeze.py --head-widths` sets it.
HEAD_WIDTHS = "split"
MAX_HEAD_GROUPS = 3
# "grouped": a further group is taken only where it cuts the fused QKV GEMM's rows by at least this
# share of the fewer groups' best (each group is one more attention call and a concatenation).
MIN_GROUP_SAVING = 0.05
# The exhaustive search of "grouped" tries (candidate widths choose g) x heads cases; above this
# many a greedy search (add the group that saves most, one at a time) is used instead.
_EXHAUSTIVE_LIMIT = 20_000_000


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
                     widths=None) -> dict:
    """Index sets and padded slots of the shrunk attention, a pure function of the three masks
    and `widths`: "split" or None (one group of all heads; its score and value widths each the
    least the heads need, a multiple of 8), "equal" (one group, one width for both, the larger),
    "grouped" (up to `MAX_HEAD_GROUPS` groups of heads, `head_groups`), an explicit `(E, Ev)` (one
    group) or explicit groups `((E, Ev, heads), ...)` (what a compact export recorded; each width
    at least what its heads need, the heads a partition of all heads).

    Returns (all int64 on the CPU unless noted): `S`, `T`, `kept_v`, `pruned_v` (full-size row
    indices), `groups` (tuple of `(E, Ev, heads)`: the padded widths of each group and its heads,
    in the order of the fused weight), `E`, `Ev` (the widest group's widths; one group: its own),
    `q_slots`, `k_slots` [|S|] and `u_slots` [#heads with T] (rows of the fused QKV weight, in its
    order: group by group, head by head, each head its `E` query, `E` key and `Ev` value rows),
    `v_slots` [|kept_v|], `one_v_slots` [#heads with pruned V], `v_columns`, `one_v_columns` (their
    columns of the context, `[..., sum of n_g * Ev_g]`, group by group, head by head), `t_heads`
    [|T|] and `pv_heads` [|pruned_v|] (rank of each row's head among those heads), `qkv_base`
    float [R] (the constant-1 features).
    """
    # CPU even inside `from_pretrained`'s meta-device context: the layout is data, not weights.
    with torch.device("cpu"):
        return _layout(query, key, value, num_heads, widths)


def _is_group_record(widths) -> bool:
    return isinstance(widths, (list, tuple)) and bool(widths) and all(
        isinstance(group, (list, tuple)) and len(group) == 3 for group in widths)


def _head_groups(score_need: torch.Tensor, value_need: torch.Tensor, widths) -> tuple[tuple[int, int, tuple], ...]:
    """The groups `((E, Ev, heads), ...)` of `attention_layout`'s `widths` rule, for the score and
    value dims each head needs ([H] each)."""
    num_heads = score_need.numel()
    every = tuple(range(num_heads))
    score, value = int(score_need.max()), int(value_need.max())
    if widths is None or widths == "split":
        return ((_round_up(score, PAD_MULTIPLE), _round_up(value, PAD_MULTIPLE), every),)
    if widths == "equal":
        width = _round_up(max(score, value), PAD_MULTIPLE)
        return ((width, width, every),)
    if widths == "grouped":
        return head_groups(score_need, value_need)
    if isinstance(widths, str):
        raise ValueError(f"head widths {widths!r}: expected 'split', 'equal', 'grouped', (score, value) "
                         f"or groups ((score, value, heads), ...)")
    groups = (tuple(widths) + (every,),) if not _is_group_record(widths) else tuple(widths)
    groups = tuple((int(E), int(Ev), tuple(int(h) for h in heads)) for E, Ev, heads in groups)
    if sorted(h for *_, heads in groups for h in heads) != list(every) or any(not heads for *_, heads in groups):
        raise ValueError(f"head groups {groups} are not a partition of the {num_heads} heads")
    for E, Ev, heads in groups:
        need = (int(score_need[list(heads)].max()), int(value_need[list(heads)].max()))
        if E < max(need[0], 1) or Ev < max(need[1], 1):
            raise ValueError(f"head widths {(E, Ev)} are below what the masks need: {need[0]} score, "
                             f"{need[1]} value dims (heads {list(heads)})")
    return groups


def head_groups(score_need: torch.Tensor, value_need: torch.Tensor, max_groups: int | None = None,
                min_saving: float | None = None) -> tuple[tuple[int, int, tuple], ...]:
    """The "grouped" rule: heads split into at most `max_groups` (default `MAX_HEAD_GROUPS`) groups,
    each padded to its own score and value widths (multiples of 8), so that the fused QKV GEMM
    computes the fewest rows, `sum over groups of n_g * (2 E_g + Ev_g)`.

    An optimal grouping's widths are each the largest its heads need, so the candidates are the pairs
    of the heads' rounded needs; every choice of g candidates is tried (each head goes to the
    cheapest group it fits) while that is small, else groups are added greedily. g groups replace
    g - 1 only where they save at least `min_saving` (default `MIN_GROUP_SAVING`) of the rows;
    each g is weighed against the best of fewer groups. Deterministic: ties go to fewer groups,
    then to the earlier candidates. Groups come out widest first, heads in order within each."""
    max_groups = MAX_HEAD_GROUPS if max_groups is None else max_groups
    min_saving = MIN_GROUP_SAVING if min_saving is None else min_saving
    need_e = torch.tensor([_round_up(int(n), PAD_MULTIPLE) for n in score_need])
    need_v = torch.tensor([_round_up(int(n), PAD_MULTIPLE) for n in value_need])
    pairs = torch.tensor([(e, v) for e in sorted(set(need_e.tolist()), reverse=True)
                          for v in sorted(set(need_v.tolist()), reverse=True)])
    fits = (pairs[:, :1] >= need_e) & (pairs[:, 1:] >= need_v)                   # [C, H]
    rows = torch.where(fits, (2 * pairs[:, 0] + pairs[:, 1]).unsqueeze(1), 1 << 40)  # 1 << 40: does not fit
    chosen, best = [0], int(rows[0].sum())  # candidate 0: the widest pair, fits every head
    for count in range(2, min(max_groups, len(pairs)) + 1):
        cases = math.comb(len(pairs), count) * count * rows.shape[1]
        if cases <= _EXHAUSTIVE_LIMIT:
            combos = torch.combinations(torch.arange(len(pairs)), count)      # [K, count], lexicographic
            totals = rows[combos].min(dim=1).values.sum(dim=1)
            index = int(torch.argmin(totals))
            option, total = combos[index].tolist(), int(totals[index])
        else:
            totals = torch.minimum(rows[chosen].min(dim=0).values, rows).sum(dim=1)
            index = int(torch.argmin(totals))
            option, total = [*chosen, index], int(totals[index])
        if total <= best * (1 - min_saving):
            chosen, best = option, total
        elif cases > _EXHAUSTIVE_LIMIT:  # greedy: the next step would start from the same groups
            break
    owner = torch.tensor(chosen)[rows[chosen].argmin(dim=0)]  # each head: the cheapest chosen group it fits
    groups = []
    for candidate in sorted(set(owner.tolist())):
        heads = tuple(int(h) for h in _indices(owner == candidate))
        groups.append((int(pairs[candidate, 0]), int(pairs[candidate, 1]), heads))
    return tuple(groups)


def _layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, widths=None) -> dict:
    query, key, value = query.cpu().bool(), key.cpu().bool(), value.cpu().bool()
    head_size = query.numel() // num_heads
    head = torch.arange(query.numel()) // head_size
    score, collapsed = query & key, ~query & key
    score_count = torch.bincount(head[score], minlength=num_heads)
    has_t = torch.bincount(head[collapsed], minlength=num_heads) > 0
    value_count = torch.bincount(head[value], minlength=num_heads)
    has_pv = torch.bincount(head[~value], minlength=num_heads) > 0
    groups = _head_groups(score_count + has_t, value_count + has_pv, widths)
    # Per head: its group's widths, its first row of the fused weight and first column of the context.
    E_of, row_of, column_of = (torch.zeros(num_heads, dtype=torch.long) for _ in range(3))
    row = column = 0
    for E, Ev, heads in groups:
        for h in heads:
            E_of[h], row_of[h], column_of[h] = E, row, column
            row, column = row + 2 * E + Ev, column + Ev

    def rank(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(heads of `mask`'s rows, each row's rank among its head's rows)."""
        rows = _indices(mask)
        count = torch.bincount(head[rows], minlength=num_heads)
        return head[rows], torch.arange(rows.numel()) - (torch.cumsum(count, 0) - count)[head[rows]]

    heads = torch.arange(num_heads)
    s_heads, s_rank = rank(score)
    q_slots = row_of[s_heads] + s_rank
    t_head_list, pv_head_list = heads[has_t], heads[has_pv]
    u_query = row_of[t_head_list] + score_count[t_head_list]  # the u_h feature's query side: the constant 1
    v_heads, v_rank = rank(value)
    v_slots = row_of[v_heads] + 2 * E_of[v_heads] + v_rank
    one_v_slots = row_of[pv_head_list] + 2 * E_of[pv_head_list] + value_count[pv_head_list]
    base = torch.zeros(row)
    base[u_query] = 1.0
    base[one_v_slots] = 1.0  # the constant-1 value feature
    rank_of = torch.full((num_heads,), -1, dtype=torch.long)
    rank_of[t_head_list] = torch.arange(t_head_list.numel())
    t_heads = rank_of[head[collapsed]]
    rank_of = torch.full((num_heads,), -1, dtype=torch.long)
    rank_of[pv_head_list] = torch.arange(pv_head_list.numel())
    widest = max(groups, key=lambda group: 2 * group[0] + group[1])
    return {"S": _indices(score), "T": _indices(collapsed), "kept_v": _indices(value), "pruned_v": _indices(~value),
            "groups": groups, "E": widest[0], "Ev": widest[1], "q_slots": q_slots, "k_slots": q_slots + E_of[s_heads],
            "u_slots": u_query + E_of[t_head_list], "v_slots": v_slots, "one_v_slots": one_v_slots,
            "v_columns": column_of[v_heads] + v_rank,
            "one_v_columns": column_of[pv_head_list] + value_count[pv_head_list],
            "t_heads": t_heads, "pv_heads": rank_of[head[~value]], "qkv_base": base}


def _gathers(layout: dict, out_rows: int, hidden: int, dtype: torch.dtype) -> dict:
    """The gather indices (and the zero / constant sources they read) that build the padded weights
    from the parameters (see the module docstring):

    - `qkv_gather` [R]: row `r` of the fused QKV weight is row `qkv_gather[r]` of
      `cat([query.weight, key.weight, u, value.weight, zero_row])`. The fused weight is in the
      layout's order (group by group, head by head: a head's `E` query, `E` key and `Ev` value
      rows), so each group's slice of the GEMM output is `[..., n_g, 2E_g + Ev_g]` and one split
      along the last dim gives its q, k and v;
    - `qkv_bias_gather` [R]: its bias element `r` is element `qkv_bias_gather[r]` of
      `cat([query.bias, key.bias, value.bias, bias_constants])`, `bias_constants` = (0, 1): the
      `u_h` rows' key side reads 0, the constant-1 features (`qkv_base`) read 1;
    - `out_gather` [context width]: column `c` of attn_out's weight is column `out_gather[c]` of
      `cat([dense.weight, w, zero_column], dim=1)`.
    """
    rows = layout["qkv_base"].numel()
    sources = torch.cat([layout["q_slots"], layout["k_slots"], layout["u_slots"], layout["v_slots"]])
    qkv_gather = torch.full((rows,), sources.numel(), dtype=torch.long)  # padding: the zero row
    qkv_gather[sources] = torch.arange(sources.numel())
    biased = torch.cat([layout["q_slots"], layout["k_slots"], layout["v_slots"]])
    zero, one = biased.numel(), biased.numel() + 1
    qkv_bias_gather = torch.full((rows,), zero, dtype=torch.long)
    qkv_bias_gather[layout["qkv_base"] != 0] = one
    qkv_bias_gather[biased] = torch.arange(biased.numel())
    columns = torch.cat([layout["v_columns"], layout["one_v_columns"]])
    width = sum(len(heads) * Ev for _, Ev, heads in layout["groups"])
    out_gather = torch.full((width,), columns.numel(), dtype=torch.long)
    out_gather[columns] = torch.arange(columns.numel())
    return {"qkv_gather": qkv_gather, "qkv_bias_gather": qkv_bias_gather, "out_gather": out_gather,
            "zero_row": torch.zeros(1, hidden, dtype=dtype), "zero_column": torch.zeros(out_rows, 1, dtype=dtype),
            "bias_constants": torch.tensor([0.0, 1.0], dtype=dtype)}


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


def _record_attention_weights(block: nn.Module, args, output) -> None:
    """Forward hook: hand the block's attention weights (eager attention) to `output_attentions=True`.

    transformers 5 collects them with forward hooks on every `BertSelfAttention` (the model's
    `_can_record_outputs`), which the shrunk block replaces, so its weights would be dropped: this
    hook does what those do (index 1 of the output, into the active collector). A module-level
    function, so the block stays picklable (transformers' own hooks are closures). transformers 4
    passes the weights up the output tuples, which the block's (output, weights) already does."""
    collected = _OUTPUT_COLLECTOR.get()
    if collected is not None and "attentions" in collected and output[1] is not None:
        collected["attentions"].append(output[1])


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
    `qkv_base` and `out_cols` record the layout (the fused weight's rows, the context's columns);
    the forward reads gather indices derived from the same masks and widths (`_gathers`, not saved).
    `groups`: the head groups, `((E, Ev, heads), ...)`; `E`, `Ev`: the widest group's widths.
    """

    LAYOUT_BUFFERS = ("qkv_rows", "qkv_base", "out_cols", "out_rows", "t_onehot", "pv_onehot")

    def __init__(self, config, masks: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                 layer_norm: nn.Module, hidden_dropout: nn.Module, attention_dropout: float,
                 widths=None):
        """masks: "query", "key", "value", "attn_out" -> bool kept [d_out] of the full block.
        tensors: the full block's weights and biases, "query.weight", ..., "attn_out.bias".
        widths: the head widths rule of `attention_layout` (None: the module's `HEAD_WIDTHS`)."""
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.num_heads
        layout = attention_layout(masks["query"], masks["key"], masks["value"], self.num_heads,
                                  HEAD_WIDTHS if widths is None else widths)
        # The head groups (`attention_layout`): static Python ints, read by every forward.
        self.groups = layout["groups"]
        self.E, self.Ev = layout["E"], layout["Ev"]
        self._group_rows = [len(heads) * (2 * E + Ev) for E, Ev, heads in self.groups]
        order = [h for *_, heads in self.groups for h in heads]  # heads in the fused weight's order
        self._head_restore = None if order == sorted(order) else [order.index(h) for h in range(self.num_heads)]
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
        self.register_buffer("out_cols", torch.cat([layout["v_columns"], layout["one_v_columns"]]).to(device),
                             persistent=True)
        self.register_buffer("out_rows", o_rows, persistent=True)
        self.register_buffer("t_onehot", _onehot(layout["t_heads"], layout["u_slots"].numel()).to(device),
                             persistent=True)
        self.register_buffer("pv_onehot", _onehot(layout["pv_heads"], layout["one_v_slots"].numel()).to(device),
                             persistent=True)
        # What the forward reads (`_gather_tensors`): a function of the layout above, rebuilt with every
        # block, so neither saved nor a buffer (`from_pretrained` builds blocks with buffers on the meta
        # device and leaves unsaved ones uninitialised); moved to the weights' device and dtype on use.
        with torch.device("cpu"):
            self._gathers = _gathers(layout, out_rows.numel(), config.hidden_size, tensors["query.weight"].dtype)
        if _OUTPUT_COLLECTOR is not None:
            self.register_forward_hook(_record_attention_weights)

    # ------------------------------------------------------------------ weights in head layout
    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [sum over groups of n_g (2E_g + Ev_g), hidden], bias) of the one QKV GEMM in the
        layout's order (group by group, head by head), built from the parameters."""
        q, k, v = self.self.query, self.self.key, self.self.value
        dtype, gathers = q.weight.dtype, self._gather_tensors()
        u = torch.mm(cast_to(self.t_onehot, dtype) * q.collapsed_bias, k.collapsed_weight)  # [heads with T, hidden]
        weight = torch.cat([q.weight, k.weight, u, v.weight, gathers["zero_row"]]).index_select(
            0, gathers["qkv_gather"])
        bias = torch.cat([q.bias, k.bias, v.bias, gathers["bias_constants"]]).index_select(
            0, gathers["qkv_bias_gather"])
        return weight, bias

    def out_weight(self, cached: bool = False) -> torch.Tensor:
        """attn_out's weight [kept rows, sum of n_g Ev_g] over the padded context, with the w_h columns (and
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
        and its constant-1 value feature, against `sum over groups of n_g (2E_g + Ev_g)`, every head
        padded to its group's widths. The difference is the zero rows the padded layout multiplies."""
        return self.qkv_rows.numel() + int((self.qkv_base != 0).sum()), self.qkv_base.numel()

    # ------------------------------------------------------------------ forward
    def matmul_flops(self) -> tuple[int, int]:
        """Forward FLOPs of the matmuls this block runs in training (2 per multiply-add, padded widths
        included): (per token: the fused QKV GEMM and attn_out's, per (query, key) pair: scores and
        context; at the wider of a group's two widths where SDPA runs without attention dropout, see
        `forward`)."""
        hidden = self.config.hidden_size
        context = sum(len(heads) * Ev for _, Ev, heads in self.groups)
        per_token = 2 * sum(self._group_rows) * hidden + 2 * self.out_rows.numel() * context
        padded = self.self.dropout.p == 0 and getattr(self.config, "_attn_implementation", "sdpa") != "eager"
        pairs = sum(len(heads) * (2 * max(E, Ev) if padded else E + Ev) for E, Ev, heads in self.groups)
        return per_token, 2 * pairs

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The tensors derived from the parameters: built in every training forward (gradients stay
        # exact), cached from one eval forward without autograd to the next (`EvalCached`).
        cached = self.eval_cached(self._eval_sources, lambda: self._derived_tensors(True), self._eval_extra_key)
        qkv_weight, qkv_bias, out_weight = cached if cached is not None else self._derived_tensors(False)
        batch, length = hidden_states.shape[:2]
        qkv = F.linear(hidden_states, qkv_weight, qkv_bias)
        # One attention call per head group, on its slice of the GEMM output (`_gathers`' order).
        parts = (qkv,) if len(self.groups) == 1 else qkv.split(self._group_rows, dim=-1)
        contexts, weights = [], []
        for part, (E, Ev, heads) in zip(parts, self.groups):
            context, weight = self._attend(part.view(batch, length, len(heads), 2 * E + Ev).transpose(1, 2),
                                           E, Ev, attention_mask)
            contexts.append(context.transpose(1, 2).reshape(batch, length, len(heads) * Ev))
            weights.append(weight)
        context = contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=-1)
        weights = None if weights[0] is None else weights[0] if len(weights) == 1 else torch.cat(weights, dim=1)
        if weights is not None and self._head_restore is not None:  # back to the heads' own order
            weights = weights[:, self._head_restore]
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

    def _attend(self, qkv: torch.Tensor, E: int, Ev: int,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, n, L, Ev], attention weights [B, n, L, L] or None) of one head group from its
        q, k, v ([B, n, L, 2E + Ev], three views)."""
        q, k, v = qkv.split([E, E, Ev], dim=-1)
        dropout = self.self.dropout.p if self.training else 0.0
        scale = self.head_size ** -0.5
        if getattr(self.config, "_attn_implementation", "sdpa") == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) * scale
            if attention_mask is not None:
                scores = scores + attention_mask
            weights = F.softmax(scores, dim=-1)
            if self.training:
                weights = F.dropout(weights, p=dropout)
            return torch.matmul(weights, v), weights
        if E != Ev and dropout == 0.0:  # flash kernels want equal widths: zero columns, exact
            if E < Ev:
                q, k = F.pad(q, (0, Ev - E)), F.pad(k, (0, Ev - E))
            else:
                v = F.pad(v, (0, E - Ev))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=scale)
        return unpadded(context, Ev), None

    def widths_record(self) -> list:
        """The head layout as a compact export records it (`attention_layout`'s explicit `widths`):
        `[E, Ev]` for one group of all heads, else `[[E, Ev, [heads]], ...]`."""
        if len(self.groups) == 1:
            return [self.E, self.Ev]
        return [[E, Ev, list(heads)] for E, Ev, heads in self.groups]

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
