"""The FLOP counter against a hand count; the telemetry line; tqdm only on a terminal."""
import torch
from transformers import BertConfig, BertForPreTraining

from vp_dist.adapters import FoldSite, fold_sites, prunable_layers
from vp_dist.squeeze import squeeze_model
from vp_dist.train.artifacts import progress_bar, telemetry_line
from vp_dist.train.flops import model_flops, peak_tflops

H, LAYERS, HEADS, FFN, VOCAB = 128, 2, 2, 512, 1000


def bert() -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, intermediate_size=FFN))


def test_dense_bert_flops_match_a_hand_count():
    flops = model_flops(bert())
    # Per layer: Q, K, V, attention output (h x h each) and FFN in/out (h x 4h each), 2 FLOPs per MAC.
    assert flops.per_token == LAYERS * (4 * 2 * H * H + 2 * 2 * H * FFN) == 786_432
    assert flops.per_prediction == 2 * H * H + 2 * H * VOCAB == 288_768      # MLM transform + decoder
    assert flops.per_sequence == 2 * H * H + 2 * H * 2 == 33_280             # pooler + NSP
    assert flops.attention_per_pair == LAYERS * 2 * 2 * H == 1_024           # Q K^T and A V
    sequences, seq_len, predictions = 2, 16, 5
    forward = (sequences * seq_len * 786_432 + predictions * 288_768 + sequences * 33_280
               + sequences * seq_len * seq_len * 1_024)
    assert flops.forward(sequences, seq_len, predictions) == forward
    assert flops.training(sequences, seq_len, predictions) == 3 * forward


def test_squeezed_layers_count_their_kept_rows_and_folded_columns():
    model = bert()
    masks = {layer.name: torch.ones(layer.module.weight.shape[0], dtype=torch.bool) for layer in prunable_layers(model)}
    masks["bert.encoder.layer.0.attention.self.query"][::2] = False          # 64 of 128 rows kept
    masks["bert.encoder.layer.1.intermediate.dense"][:FFN // 2] = False      # FFN-in 256 of 512, folded
    # FFN folds only, as the engine rebuild squeezes: the query is a row-squeezed SqueezedLinear
    squeeze_model(model, masks, [site for site in fold_sites(model) if isinstance(site, FoldSite)])
    dense = model_flops(bert())
    squeezed = model_flops(model)
    saved = 2 * (H // 2) * H + 2 * (FFN // 2) * H + 2 * H * (FFN // 2)      # query rows, FFN-in rows, FFN-out columns
    assert dense.per_token - squeezed.per_token == saved == 147_456
    assert (squeezed.per_prediction, squeezed.per_sequence) == (dense.per_prediction, dense.per_sequence)
    assert squeezed.attention_per_pair == dense.attention_per_pair


def test_the_shrunk_attention_counts_the_gemms_it_runs():
    model = bert()
    masks = {layer.name: torch.ones(layer.module.weight.shape[0], dtype=torch.bool) for layer in prunable_layers(model)}
    masks["bert.encoder.layer.0.attention.self.key"][::2] = False     # half of each head's score dims
    masks["bert.encoder.layer.0.attention.self.value"][::2] = False   # half of its value dims
    masks["bert.encoder.layer.0.attention.output.dense"][:H // 4] = False
    squeeze_model(model, masks, fold_sites(model))
    block = model.bert.encoder.layer[0].attention
    E, Ev, heads = block.E, block.Ev, HEADS                            # padded score / value widths per head
    assert (E, Ev) == (32, 40)  # 32 score dims; 32 value dims + 1 constant feature, padded to a multiple of 8
    dense, squeezed = model_flops(bert()), model_flops(model)
    qkv_and_out = 2 * heads * (2 * E + Ev) * H + 2 * (H - H // 4) * heads * Ev
    assert squeezed.per_token == dense.per_token - 4 * 2 * H * H + qkv_and_out
    assert squeezed.attention_per_pair == 2 * heads * (E + Ev) + 2 * 2 * H * (LAYERS - 1)


def test_masked_rows_still_cost_their_flops():
    model = bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[::2] = 0   # zero rows are still multiplied
    assert model_flops(model) == model_flops(bert())


def test_peak_tflops_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") is None
    assert peak_tflops(None, "bf16") is None                      # CPU: no MFU
    assert peak_tflops("Some Future GPU", "bf16") is None
    assert peak_tflops("Some Future GPU", "bf16", configured=500.0) == 500.0


def test_telemetry_line_holds_every_figure():
    entry = {"step": 120, "phase": "mlm", "loss": 6.81234, "lr": 3.6e-4, "tokens_per_s": 52310.4,
             "tflops_per_gpu": 145.25, "mfu": 0.1468, "peak_memory_bytes": 23 * 2**30, "sparsity": 0.2}
    assert telemetry_line(entry) == ("step 120 (mlm) | loss 6.8123 | lr 3.600e-04 | 52,310 tokens/s | "
                                     "145.25 TFLOP/s/GPU | MFU 14.7% | peak mem 23.00 GiB | sparsity 0.200")
    assert "MFU n/a" in telemetry_line({**entry, "mfu": None})


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert progress_bar(0, 10, 0).disable
    assert progress_bar(1, 10, 0).disable
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    bar = progress_bar(0, 10, 0)
    assert not bar.disable and progress_bar(1, 10, 0).disable  # a terminal: rank 0 only
    bar.close()
