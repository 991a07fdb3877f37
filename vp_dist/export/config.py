"""The compact checkpoint's config: a BERT config plus the squeezed structure of its layers.

`vp_kept_rows` maps every squeezed layer (named inside the base `BertModel`, e.g.
`encoder.layer.3.attention.self.query`) to the number of rows it keeps; `vp_folded_ffn` lists the
FFN-in layers whose pruned rows were folded into FFN-out's bias (SPEC 5), so FFN-out lost the
matching input columns; `vp_attention` maps every shrunk attention block (`encoder.layer.3.attention`)
to the hex-encoded kept masks of its query, key, value and attn_out, from which its layout follows
(`vp_dist.squeeze.attention`). The kept row positions travel in the weights file (`kept_rows` buffers).
Everything else is a stock `BertConfig`, so the base config is recovered exactly.
"""
from __future__ import annotations

from transformers import BertConfig

VP_FIELDS = ("vp_kept_rows", "vp_folded_ffn", "vp_attention")


class VPBertConfig(BertConfig):
    """`BertConfig` of a squeezed BERT (model_type "vp_bert"), loaded by `vp_dist.export`'s models."""

    model_type = "vp_bert"

    vp_kept_rows: dict | None = None
    vp_folded_ffn: list | None = None
    vp_attention: dict | None = None

    @classmethod
    def from_bert_config(cls, config: BertConfig, kept_rows: dict[str, int],
                         folded_ffn: list[str], attention: dict | None = None) -> "VPBertConfig":
        values = {k: v for k, v in config.to_dict().items()
                  if k not in ("model_type", "transformers_version", *VP_FIELDS)}
        return cls(**values, vp_kept_rows=dict(kept_rows), vp_folded_ffn=list(folded_ffn),
                   vp_attention=dict(attention or {}))

    def to_bert_config(self) -> BertConfig:
        """The full-size model's config (model_type "bert"), for the masked export."""
        values = {k: v for k, v in self.to_dict().items()
                  if k not in ("model_type", "transformers_version", *VP_FIELDS)}
        return BertConfig(**values)
