"""Global per-type choice of rows to prune (SPEC 3, eqs. 5-6). Pure functions on flat tensors."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def select_rows(ewmv: torch.Tensor, kept: torch.Tensor, type_rows: dict[str, torch.Tensor],
                row_layer: torch.Tensor, sparsity: float, min_rows_per_layer: int = 0,
                align: int = 1) -> torch.Tensor:
    """New kept mask after raising every projection type to `sparsity`.

    ewmv [D] float; kept [D] bool (False = pruned earlier, stays pruned); type_rows maps a
    projection type to its flat row indices in (layer, row) order; row_layer [D] layer of each row.
    For each type, exactly `round(sparsity * rows_of_type)` rows end up pruned (fewer only when
    the per-layer floor forbids more), lowest EWMV first, ties broken by (layer, row).
    NaN variances count as +inf (never preferred).
    align > 1 (SPEC 3, optional): afterwards every layer's kept rows are rounded up to a multiple
    of `align` by giving back its highest-EWMV newly pruned rows (`align_kept_rows`).
    """
    new_kept = kept.clone()
    for projection_type, rows in type_rows.items():
        rows = rows.to(kept.device)
        goal = round(sparsity * rows.numel())
        already = int((~kept[rows]).sum())
        wanted = goal - already
        if wanted <= 0:
            continue
        candidates = rows[kept[rows]]  # still in (layer, row) order
        values = torch.nan_to_num(ewmv[candidates].double(), nan=float("inf"))
        order = torch.sort(values, stable=True).indices  # stable: ties keep (layer, row) order
        ranked = candidates[order]
        if min_rows_per_layer > 0:
            ranked = ranked[_within_floor(ranked, kept, row_layer, min_rows_per_layer)]
        chosen = ranked[:wanted]
        if chosen.numel() < wanted:
            logger.warning("%s: min_rows_per_layer=%d allows %d more pruned rows, not %d",
                           projection_type, min_rows_per_layer, chosen.numel(), wanted)
        new_kept[chosen] = False
    if align > 1:
        new_kept = align_kept_rows(ewmv, kept, new_kept, row_layer, align)
    return new_kept


def align_kept_rows(ewmv: torch.Tensor, kept: torch.Tensor, new_kept: torch.Tensor, row_layer: torch.Tensor,
                    align: int) -> torch.Tensor:
    """Round each layer's kept count up to a multiple of `align` (faster GEMM shapes).

    Only rows newly pruned at this step come back, highest EWMV first (ties by row); rows pruned
    earlier stay pruned. If the previous kept counts were multiples of `align` (every pruning
    aligned), the rounded count never exceeds the previous one, so enough rows are there.
    The per-type counts of SPEC 3 are then no longer exact: each layer keeps up to `align - 1`
    more rows than the global selection chose.
    """
    out = new_kept.clone()
    for layer in torch.unique(row_layer).tolist():
        rows = torch.nonzero(row_layer == layer, as_tuple=False).flatten()
        short = -int(out[rows].sum()) % align
        newly = rows[kept[rows] & ~out[rows]]
        if short == 0 or newly.numel() == 0:
            continue
        values = torch.nan_to_num(ewmv[newly].double(), nan=float("inf"))
        back = newly[torch.sort(-values, stable=True).indices[:short]]
        out[back] = True
    return out


def _within_floor(ranked: torch.Tensor, kept: torch.Tensor, row_layer: torch.Tensor,
                  floor: int) -> torch.Tensor:
    """Bool mask over `ranked`: rows that can go while each layer keeps >= `floor` rows.

    Within a layer the allowed rows are a prefix of its ranked rows, so filtering then taking the
    first `wanted` equals the greedy global choice under the floor.
    """
    layers = row_layer[ranked]
    num_layers = int(row_layer.max()) + 1
    kept_per_layer = torch.bincount(row_layer[kept], minlength=num_layers)
    # Rank of each candidate among its own layer's candidates, in global order.
    by_layer = torch.sort(layers, stable=True)
    position = torch.arange(ranked.numel(), device=ranked.device)
    first_of_layer = torch.zeros(num_layers, dtype=torch.long, device=ranked.device)
    counts = torch.bincount(layers, minlength=num_layers)
    first_of_layer[1:] = torch.cumsum(counts, 0)[:-1]
    rank_in_layer = torch.empty_like(position)
    rank_in_layer[by_layer.indices] = position - first_of_layer[by_layer.values]
    return rank_in_layer < (kept_per_layer[layers] - floor).clamp_min(0)
