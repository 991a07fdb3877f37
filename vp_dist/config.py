"""Typed configuration for Variance Pruning, validated on construction.

Every check names the bad field and the fix, so a run fails at start-up rather than at step 2,500.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class VPConfig:
    """Variance Pruning settings (SPEC 1-5; paper defaults).

    start:      optimizer step of the first pruning (paper: 500).
    interval:   optimizer steps between prunings (paper: 500).
    increment:  cumulative sparsity added at each pruning (paper: 0.1).
    target:     final fraction of rows pruned per projection type (paper: 0.5).
    alpha:      EWMV weight of the newest step variance (eq. 4; paper: 0.9).
    min_rows_per_layer: floor of kept rows in any one layer (0: a layer may lose every row).
    align:      round each layer's kept rows up to a multiple of `align` after the global selection
        (SPEC 3, optional; 1 = off, the exact per-type counts). 8 or 64 give GEMM-friendly widths.
    pad_ffn:    when squeezing, round each folded FFN's inner width up to a multiple of `pad_ffn` with
        zero units (exact, in training too; SPEC 3's counts and the masks unchanged; 1 = off). 8 gives
        GEMM-friendly widths without `align`'s extra kept rows (`vp_dist.squeeze.squeeze_model`).
        Not applied by the tensor-parallel squeeze.
    head_widths: the head layout of the exact attention shrink (`vp_dist.squeeze.attention`):
        "split" (every head of a layer padded to one score and one value width, multiples of 8),
        "equal" (one width for both) or "grouped" (heads in up to 3 groups, each padded to its own
        widths: fewer zero rows in the QKV GEMM, one attention call per group). Exact in every case;
        with attention dropout "grouped" draws the dropout masks per group.
    stats_dtype: accumulation dtype of the per-step sums ("float64" per SPEC 1; each micro-batch
        is first summed in fp32 around a shift, see vp_dist/stats.py).
    squeeze_at_target: rebuild the DeepSpeed engine around the squeezed model right after the
        final pruning (engine mode only; a plain model is squeezed with `pruner.squeeze()`).
    fold_ffn:   when squeezing, fold pruned constants into their consumers (SPEC 5, exact): FFN-in
        rows into the FFN-out bias, and the attention shrink of BERT-layout blocks
        (`vp_dist.squeeze.attention`).
    verify_masks: check that every data-parallel rank holds identical masks after each pruning.
    warn_dropped_steps: warn loudly when more steps than this in one pruning window had
        non-finite statistics (each such step is dropped and logged; SPEC 1).
    """

    start: int = 500
    interval: int = 500
    increment: float = 0.1
    target: float = 0.5
    alpha: float = 0.9
    min_rows_per_layer: int = 0
    align: int = 1
    pad_ffn: int = 1
    head_widths: str = "split"
    stats_dtype: str = "float64"
    squeeze_at_target: bool = False
    fold_ffn: bool = True
    verify_masks: bool = True
    warn_dropped_steps: int = 10  # dropped (non-finite) steps per window before a loud warning
    families: tuple = field(default=(), compare=False)  # extra adapter families, see adapters

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"VPConfig: {message}")

        # Typed text (YAML, the command line) comes through from_dict, which converts '1e-1' first.
        integers = ("start", "interval", "min_rows_per_layer", "align", "pad_ffn", "warn_dropped_steps")
        for names, kinds, what in ((integers, int, "an integer"),
                                   (("increment", "target", "alpha"), (int, float), "a number"),
                                   (("squeeze_at_target", "fold_ffn", "verify_masks"), bool, "true or false")):
            for name in names:
                value = getattr(self, name)
                need(isinstance(value, kinds) and (kinds is bool or not isinstance(value, bool)),
                     f"{name}={value!r} must be {what}")
        need(self.start >= 1, f"start={self.start} must be >= 1 (statistics need at least one step)")
        need(self.interval >= 1, f"interval={self.interval} must be >= 1")
        need(self.warn_dropped_steps >= 0, f"warn_dropped_steps={self.warn_dropped_steps} must be >= 0")
        need(self.min_rows_per_layer >= 0, f"min_rows_per_layer={self.min_rows_per_layer} must be >= 0")
        need(self.align >= 1, f"align={self.align} must be >= 1 (1: off)")
        need(self.pad_ffn >= 1, f"pad_ffn={self.pad_ffn} must be >= 1 (1: off)")
        need(0.0 < self.target < 1.0, f"target={self.target} must be in (0, 1)")
        need(0.0 < self.increment <= self.target,
             f"increment={self.increment} must be in (0, target={self.target}]")
        need(0.0 < self.alpha <= 1.0, f"alpha={self.alpha} must be in (0, 1]")
        need(self.head_widths in ("split", "equal", "grouped"),
             f"head_widths={self.head_widths!r} must be 'split', 'equal' or 'grouped'")
        need(self.stats_dtype in ("float64", "float32"),
             f"stats_dtype={self.stats_dtype!r} must be 'float64' or 'float32'")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("families")
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "VPConfig":
        """From a mapping of text or values (YAML, JSON, a command line): types converted and checked
        by pydantic ('1e-1' -> 0.1), unknown fields refused; raises `vp_dist.cli.ConfigError`."""
        from .cli import ConfigError, validate
        if "families" in values:
            raise ConfigError("VPConfig: families are Python objects; pass them to VPConfig(...) directly")
        return validate(cls, values)
