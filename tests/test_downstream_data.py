"""GLUE and SQuAD v1.1 data: loading from the real file formats, features, and answer decoding.

Fixtures are a few rows per file in the original formats (tests/fixtures/glue/<Task>/*.tsv,
tests/fixtures/squad/*-v1.1.json). The tokenizer is a BERT WordPiece trained here, offline.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

from vp_dist.downstream.glue import (  # noqa: E402
    GLUE_HUB_PATH,
    GLUE_TASKS,
    get_glue_task,
    load_glue,
    predictions_from_logits,
    read_glue_file,
    tokenize_glue,
)
from vp_dist.downstream.squad import (  # noqa: E402
    QA_MODEL_INPUTS,
    SQUAD_HUB_PATH,
    answer_token_span,
    evaluate_squad,
    load_squad,
    postprocess_qa_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_file,
)

FIXTURES = Path(__file__).parent / "fixtures"
GLUE_DIRS = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B",
    "qqp": "QQP", "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE",
}
SQUAD_DIR = FIXTURES / "squad"


def glue_dir(task: str) -> Path:
    return FIXTURES / "glue" / GLUE_DIRS[task]


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 3000) -> BertTokenizer:
    """A BERT tokenizer whose WordPiece vocabulary is trained on `texts` (no download)."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    wordpiece.train_from_iterator(texts, trainer)
    return BertTokenizer(vocab=wordpiece.get_vocab())


def fixture_texts() -> list[str]:
    texts = []
    for task in GLUE_TASKS.values():
        for split in load_glue(task, glue_dir(task.name)).values():
            for column in task.text_columns:
                texts.extend(split[column])
    for split in load_squad(SQUAD_DIR).values():
        texts.extend(split["context"])
        texts.extend(split["question"])
    return texts


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return train_wordpiece_tokenizer(fixture_texts())


def compact(text: str) -> str:
    """Lowercase without whitespace: compares decoded WordPieces with the original text."""
    return "".join(text.lower().split())


# --- GLUE: task table --------------------------------------------------------------------------


def test_task_table_num_labels():
    assert {name: task.num_labels for name, task in GLUE_TASKS.items()} == {
        "cola": 2, "sst2": 2, "mrpc": 2, "stsb": 1, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2,
    }


def test_mnli_evaluates_on_matched_and_mismatched_validation():
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert GLUE_TASKS["rte"].eval_splits == ("validation",)


@pytest.mark.parametrize("spelling", ["SST-2", "sst_2", "sst2", "Sst-2"])
def test_task_names_accept_glue_spellings(spelling):
    assert get_glue_task(spelling).name == "sst2"


def test_unknown_task_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'wnli'; known tasks: \['cola'"):
        load_glue("wnli", glue_dir("rte"))


# --- GLUE: loading the original TSV files --------------------------------------------------------


@pytest.mark.parametrize(
    "task, labels_of_split",
    [
        ("cola", {"train": [1, 0, 1], "validation": [1, 0]}),
        ("sst2", {"train": [0, 0, 1], "validation": [1, 0]}),
        ("mrpc", {"train": [1, 0], "validation": [1, 0]}),
        ("stsb", {"train": [5.0, 3.8], "validation": [5.0, 0.25]}),
        ("qqp", {"train": [0, 1], "validation": [0, 0, 1]}),
        # entailment=0, neutral=1, contradiction=2 (HF `glue` ClassLabel order)
        ("mnli", {"train": [1, 0, 0, 2], "validation_matched": [1, 2],
                  "validation_mismatched": [2, 2, 0]}),
        ("qnli", {"train": [1, 1, 0], "validation": [0, 1]}),  # not_entailment=1
        ("rte", {"train": [1, 0], "validation": [1, 0]}),
    ],
)
def test_each_task_loads_its_glue_tsv_files_as_hf_rows(task, labels_of_split):
    splits = load_glue(task, glue_dir(task))
    assert list(splits) == list(labels_of_split)
    for split, labels in labels_of_split.items():
        assert splits[split]["label"] == pytest.approx(labels), split
        assert splits[split]["idx"] == list(range(len(labels)))
        assert splits[split].column_names == [*GLUE_TASKS[task].text_columns, "label", "idx"]


def test_cola_sentence_is_the_fourth_column_of_a_headerless_file():
    train = load_glue("cola", glue_dir("cola"), splits=["train"])["train"]
    assert train[1] == {"sentence": "They drank the pub.", "label": 0, "idx": 1}


def test_tsv_quotes_are_text_and_a_byte_order_mark_is_ignored():
    # MRPC's train.tsv starts with a BOM before "Quality" and has unbalanced " in sentences.
    train = read_glue_file("mrpc", glue_dir("mrpc") / "train.tsv")
    assert train[0]["sentence1"].startswith('Amrozi accused his brother , whom he called " the')
    assert train[0]["sentence2"].endswith("distorting his evidence .")
    assert train.features["label"].names == ["not_equivalent", "equivalent"]


def test_mnli_reads_premise_and_hypothesis_from_sentence1_and_sentence2():
    mismatched = load_glue("mnli", glue_dir("mnli"), splits=["validation_mismatched"])
    row = mismatched["validation_mismatched"][2]
    assert row["premise"].startswith("We serve a classic Tuscan meal")
    assert row["hypothesis"] == "We serve a meal of Florentine terrine."
    assert row["label"] == 0


# --- GLUE: JSON / JSONL with HF columns ----------------------------------------------------------


def test_jsonl_and_json_list_with_hf_columns_load_like_the_tsv(tmp_path):
    from_tsv = load_glue("rte", glue_dir("rte"))
    from_tsv["train"].to_json(tmp_path / "train.jsonl")  # JSON lines, HF's default
    (tmp_path / "validation.json").write_text(json.dumps(from_tsv["validation"].to_list()))
    from_json = load_glue("rte", tmp_path)
    for split in from_tsv:
        assert from_json[split].to_list() == from_tsv[split].to_list()


def test_json_labels_may_be_class_names(tmp_path):
    rows = [
        {"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": "entailment"},
        {"premise": "A man sleeps.", "hypothesis": "A man runs.", "label": 2},
    ]
    path = tmp_path / "validation_matched.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset = read_glue_file("mnli", path)
    assert dataset["label"] == [0, 2]
    assert dataset["idx"] == [0, 1]


# --- GLUE: bad input -----------------------------------------------------------------------------


def test_missing_split_file_names_the_files_tried(tmp_path):
    expected = r"split 'validation'.*\['dev.tsv', 'validation.jsonl'"
    with pytest.raises(FileNotFoundError, match=expected):
        load_glue("rte", tmp_path, splits=["validation"])


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_glue("rte", tmp_path / "no_such_dir")


def test_two_files_for_one_split_are_an_error(tmp_path):
    (tmp_path / "dev.tsv").write_text((glue_dir("rte") / "dev.tsv").read_text())
    (tmp_path / "validation.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"several files.*\['dev.tsv', 'validation.jsonl'\]"):
        load_glue("rte", tmp_path, splits=["validation"])


BAD_FILES = {  # test id: (file name, content, task, message expected)
    "tsv_without_the_label_column_names_it": (
        "dev.tsv", "index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n", "rte",
        r"lacks column\(s\) \['label'\]"),
    "json_without_a_text_column_names_it": (
        "train.jsonl", json.dumps({"premise": "a", "label": 0}) + "\n", "mnli",
        r"row 0 lacks column\(s\) \['hypothesis'\]"),
    "unknown_label_string_names_it_and_its_line": (
        "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tc\tmaybe\n", "rte",
        r"unknown label 'maybe' at .*dev.tsv:3 for task rte"),
    "out_of_range_class_id_is_an_unknown_label": (
        "train.tsv", "sentence\tlabel\ngood\t2\n", "sst2", r"unknown label 2 .* 0\.\.1"),
    "non_numeric_sts_b_score_is_an_error": (
        "train.jsonl", json.dumps({"sentence1": "a", "sentence2": "b", "label": "high"}) + "\n", "stsb",
        "label 'high' .* is not a number"),
    "row_with_missing_fields_names_the_line": (
        "train.tsv", "gj04\t1\t\tFine sentence.\ngj04\t0\tBroken row.\n", "cola",
        r"train.tsv:2 has 3 tab-separated fields, expected 4"),
    "unsupported_file_type_is_named": (
        "train.csv", "sentence,label\n", "sst2", "unsupported file type '.csv'"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_glue_file_is_refused_with_its_fault_named(case, tmp_path):
    name, content, task, expected = BAD_FILES[case]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=expected):
        read_glue_file(task, path)


# --- GLUE: the hub path, up to the network call -------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset; record its calls and answer with `fake_hub.answer`."""

    class FakeHub:
        calls: list = []
        answer: DatasetDict | None = None

        def load_dataset(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            return self.answer

    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub.load_dataset)
    return hub


def test_hub_glue_asks_for_the_task_config_and_keeps_train_and_eval_splits(fake_hub):
    local = load_glue("mnli", glue_dir("mnli"))
    fake_hub.answer = DatasetDict({**local, "test_matched": local["validation_matched"]})
    splits = load_glue("MNLI")
    assert fake_hub.calls == [((GLUE_HUB_PATH, "mnli"), {})]
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    assert splits["train"]["label"] == [1, 0, 0, 2]


def test_hub_glue_without_a_requested_split_names_it(fake_hub):
    fake_hub.answer = DatasetDict({"train": load_glue("rte", glue_dir("rte"))["train"]})
    with pytest.raises(ValueError, match=r"no split\(s\) \['validation'\]; it has \['train'\]"):
        load_glue("rte")


# --- GLUE: tokenisation --------------------------------------------------------------------------


def test_tokenize_glue_gives_padded_bert_features_for_sentence_pairs(tokenizer):
    rte = load_glue("rte", glue_dir("rte"))["validation"]
    features = tokenize_glue(rte, "rte", tokenizer, max_seq_len=64)
    assert features.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    assert features["labels"] == [1, 0]
    expected = tokenizer(rte[1]["sentence1"], rte[1]["sentence2"])
    n_tokens = len(expected["input_ids"])
    row = features[1]
    assert row["input_ids"] == expected["input_ids"] + [tokenizer.pad_token_id] * (64 - n_tokens)
    assert row["attention_mask"] == [1] * n_tokens + [0] * (64 - n_tokens)
    assert row["token_type_ids"][:n_tokens] == expected["token_type_ids"]
    assert row["input_ids"][0] == tokenizer.cls_token_id
    assert 1 in row["token_type_ids"]  # the second sentence is segment B


def test_tokenize_glue_truncates_to_max_seq_len(tokenizer):
    qnli = load_glue("qnli", glue_dir("qnli"))["train"]
    features = tokenize_glue(qnli, "qnli", tokenizer, max_seq_len=16)
    for row in features:
        assert len(row["input_ids"]) == 16
        assert sum(row["attention_mask"]) == 16
        assert row["input_ids"].count(tokenizer.sep_token_id) == 2


def test_single_sentence_tasks_use_segment_a_only(tokenizer):
    sst2 = load_glue("sst2", glue_dir("sst2"))["train"]
    features = tokenize_glue(sst2, "sst2", tokenizer, max_seq_len=32)
    assert all(set(row["token_type_ids"]) == {0} for row in features)


def test_sts_b_labels_are_float32_scores_and_classes_int64(tokenizer):
    stsb = tokenize_glue(load_glue("stsb", glue_dir("stsb"))["train"], "stsb", tokenizer, 32)
    assert stsb.features["labels"].dtype == "float32"
    assert stsb["labels"] == pytest.approx([5.0, 3.8])
    cola = tokenize_glue(load_glue("cola", glue_dir("cola"))["train"], "cola", tokenizer, 32)
    assert cola.features["labels"].dtype == "int64"


def test_tokenize_glue_rejects_a_tiny_max_seq_len(tokenizer):
    with pytest.raises(ValueError, match="max_seq_len=2"):
        tokenize_glue(load_glue("rte", glue_dir("rte"))["train"], "rte", tokenizer, 2)


def test_predictions_from_logits():
    assert predictions_from_logits("mnli", [[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]).tolist() == [1, 0]
    assert predictions_from_logits("stsb", [[4.5], [0.5]]).tolist() == [4.5, 0.5]
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for mnli; expected \(N, 3\)"):
        predictions_from_logits("mnli", [[0.1, 2.0], [3.0, 0.0]])


# --- SQuAD: loading ------------------------------------------------------------------------------


def test_official_json_becomes_one_row_per_question():
    dev = load_squad(SQUAD_DIR)["validation"]
    assert dev.column_names == ["id", "title", "context", "question", "answers"]
    assert len(dev) == 5
    row = dev[1]
    assert row["id"] == "56be4db0acb8001400a502ee"
    assert row["title"] == "Super_Bowl_50"
    assert row["question"] == "Where did Super Bowl 50 take place?"
    assert row["answers"]["text"][1] == "Levi's Stadium"
    start = row["answers"]["answer_start"][1]
    assert row["context"][start : start + len("Levi's Stadium")] == "Levi's Stadium"


def test_jsonl_with_hf_columns_loads_like_the_official_json(tmp_path):
    official = load_squad(SQUAD_DIR, splits=["validation"])["validation"]
    official.to_json(tmp_path / "validation.jsonl")
    assert load_squad(tmp_path, splits=["validation"])["validation"].to_list() == official.to_list()


def test_hub_squad_is_asked_for_and_split(fake_hub):
    fake_hub.answer = DatasetDict(load_squad(SQUAD_DIR))
    splits = load_squad(splits=["validation"])
    assert fake_hub.calls == [((SQUAD_HUB_PATH,), {})]
    assert list(splits) == ["validation"] and len(splits["validation"]) == 5


def test_hub_squad_without_a_requested_split_names_it(fake_hub):
    fake_hub.answer = DatasetDict({"train": load_squad(SQUAD_DIR)["train"]})
    with pytest.raises(ValueError, match=r"no split\(s\) \['validation'\]; it has \['train'\]"):
        load_squad()


def test_squad_question_without_a_field_names_its_place(tmp_path):
    document = json.loads((SQUAD_DIR / "dev-v1.1.json").read_text())
    del document["data"][1]["paragraphs"][0]["qas"][1]["question"]
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(document))
    expected = r"data\[1\]\.paragraphs\[0\]\.qas\[1\] lacks field 'question'"
    with pytest.raises(ValueError, match=expected):
        read_squad_file(path)


def test_squad_repeated_question_ids_are_an_error(tmp_path):
    document = json.loads((SQUAD_DIR / "dev-v1.1.json").read_text())
    qas = document["data"][0]["paragraphs"][0]["qas"]
    qas[1]["id"] = qas[0]["id"]
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="repeated: \\['56be4db0acb8001400a502ec'\\]"):
        read_squad_file(path)


def test_squad_missing_files_and_unknown_splits_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\['dev-v1.1.json', 'validation.jsonl'"):
        load_squad(tmp_path, splits=["validation"])
    with pytest.raises(ValueError, match=r"unknown SQuAD split\(s\) \['test'\]"):
        load_squad(SQUAD_DIR, splits=["test"])


# --- SQuAD: features -----------------------------------------------------------------------------


def test_answer_token_span_by_hand():
    # [CLS] q [SEP] "in paris today" [SEP]; answer "paris" at chars 3..8
    offsets = [(0, 0), (0, 1), (0, 0), (0, 2), (3, 8), (9, 14), (0, 0)]
    sequence_ids = [None, 0, None, 1, 1, 1, None]
    assert answer_token_span(offsets, sequence_ids, 3, "paris") == (4, 4)
    assert answer_token_span(offsets, sequence_ids, 3, "paris today") == (4, 5)
    assert answer_token_span(offsets, sequence_ids, 12, "day after") is None  # runs off the window


def test_train_features_point_at_the_answer_or_at_cls(tokenizer):
    dev = load_squad(SQUAD_DIR)["validation"]
    for example in dev:
        features = prepare_train_features(
            Dataset.from_list([example]), tokenizer, max_seq_len=40, doc_stride=16
        )
        answer = example["answers"]["text"][0]
        windows_with_answer = 0
        for row in features:
            start, end = row["start_positions"], row["end_positions"]
            if (start, end) == (0, 0):  # [CLS]: the answer is not wholly in this window
                continue
            windows_with_answer += 1
            assert compact(tokenizer.decode(row["input_ids"][start : end + 1])) == compact(answer)
            assert set(row["token_type_ids"][start : end + 1]) == {1}  # inside the context
        assert windows_with_answer >= 1, example["id"]
        if example["title"] == "Super_Bowl_50":
            assert len(features) > 1  # a long context is split into windows
            assert len(features) > windows_with_answer  # and some windows miss the answer


def test_train_features_have_model_inputs_and_positions(tokenizer):
    train = load_squad(SQUAD_DIR)["train"]
    features = prepare_train_features(train, tokenizer)  # 384 / 128: one window per question
    assert features.column_names == [*QA_MODEL_INPUTS, "start_positions", "end_positions"]
    assert len(features) == 2
    assert all(len(row["input_ids"]) == 384 for row in features)
    start, end = features[0]["start_positions"], features[0]["end_positions"]
    assert compact(tokenizer.decode(features[0]["input_ids"][start : end + 1])) == compact(
        "a copper statue of Christ"
    )


def test_eval_features_keep_context_offsets_and_example_ids(tokenizer):
    dev = load_squad(SQUAD_DIR)["validation"]
    features = prepare_eval_features(dev, tokenizer, max_seq_len=40, doc_stride=16)
    assert features.column_names == [*QA_MODEL_INPUTS, "example_id", "offset_mapping"]
    assert set(features["example_id"]) == set(dev["id"])
    context_of = dict(zip(dev["id"], dev["context"]))
    for row in features:
        context = context_of[row["example_id"]]
        for token_id, segment, offset in zip(
            row["input_ids"], row["token_type_ids"], row["offset_mapping"]
        ):
            if offset is None:  # question, [CLS], [SEP] and padding
                assert segment == 0 or token_id in (tokenizer.sep_token_id, tokenizer.pad_token_id)
                continue
            assert segment == 1
            piece = tokenizer.convert_ids_to_tokens(token_id).removeprefix("##")
            assert compact(context[offset[0] : offset[1]]) == piece


def test_doc_stride_must_be_smaller_than_max_seq_len(tokenizer):
    dev = load_squad(SQUAD_DIR)["validation"]
    with pytest.raises(ValueError, match=r"doc_stride=64 must be in \(0, max_seq_len=64\)"):
        prepare_eval_features(dev, tokenizer, max_seq_len=64, doc_stride=64)


# --- SQuAD: logits back to text -------------------------------------------------------------------


def answer_window_and_tokens(features, example, answer_index=0):
    """(feature, start token, end token) of a window whose offsets cover an answer exactly."""
    answer_text = example["answers"]["text"][answer_index]
    answer_start = example["answers"]["answer_start"][answer_index]
    answer_end = answer_start + len(answer_text)
    windows = zip(features["example_id"], features["offset_mapping"])
    for index, (example_id, offsets) in enumerate(windows):
        if example_id != example["id"]:
            continue
        starts = [k for k, o in enumerate(offsets) if o is not None and o[0] == answer_start]
        ends = [k for k, o in enumerate(offsets) if o is not None and o[1] == answer_end]
        if starts and ends:
            return index, starts[0], ends[0]
    raise AssertionError(f"no window holds {answer_text!r}")


@pytest.fixture(scope="module")
def dev_and_features(tokenizer):
    dev = load_squad(SQUAD_DIR)["validation"]
    return dev, prepare_eval_features(dev, tokenizer, max_seq_len=40, doc_stride=16)


def logits_pointing_at(features, spans):
    """Zero logits except 10 at each (feature, start) and (feature, end) in `spans`."""
    seq_len = len(features[0]["input_ids"])
    start_logits = np.zeros((len(features), seq_len))
    end_logits = np.zeros((len(features), seq_len))
    for feature, start, end in spans:
        start_logits[feature, start] = 10.0
        end_logits[feature, end] = 10.0
    return start_logits, end_logits


def test_logits_at_a_known_span_recover_its_text(dev_and_features):
    dev, features = dev_and_features
    spans = [answer_window_and_tokens(features, row) for row in dev]
    start_logits, end_logits = logits_pointing_at(features, spans)
    predictions = postprocess_qa_predictions(dev, features, start_logits, end_logits)
    assert predictions == {row["id"]: row["answers"]["text"][0] for row in dev}
    assert predictions["56be4db0acb8001400a502ee"] == "Santa Clara, California"  # original casing
    assert evaluate_squad(dev, features, start_logits, end_logits) == {
        "exact_match": 100.0, "f1": 100.0,
    }


def test_spans_longer_than_max_answer_length_are_skipped(dev_and_features):
    dev, features = dev_and_features
    row = dev[1]  # answer 2: "Levi's Stadium in the San Francisco Bay Area at Santa Clara, ..."
    window, start, end = answer_window_and_tokens(features, row, answer_index=2)
    start_logits, end_logits = logits_pointing_at(features, [(window, start, end)])
    n_tokens = end - start + 1
    longest = postprocess_qa_predictions(
        dev.select([1]), features, start_logits, end_logits, max_answer_length=n_tokens
    )
    assert longest[row["id"]] == row["answers"]["text"][2]
    shorter = postprocess_qa_predictions(
        dev.select([1]), features, start_logits, end_logits, max_answer_length=n_tokens - 1
    )
    assert shorter[row["id"]] != row["answers"]["text"][2]


def test_end_before_start_and_question_tokens_are_never_answers(dev_and_features):
    dev, features = dev_and_features
    row = dev[3]  # "In what country is Normandy located?" -> "France"
    window, start, end = answer_window_and_tokens(features, row)
    start_logits, end_logits = logits_pointing_at(features, [(window, start, end)])
    end_logits[end_logits == 0.0] = -100.0  # only `end` is a plausible end
    start_logits[window, 1] = 50.0  # a question token: no offsets
    start_logits[window, end + 1] = 40.0  # a context token after the only plausible end
    predictions = postprocess_qa_predictions(dev.select([3]), features, start_logits, end_logits)
    assert predictions == {row["id"]: "France"}


def test_the_best_window_wins(dev_and_features):
    dev, features = dev_and_features
    row = dev[0]  # "Denver Broncos"; decoy: a one-token span in another window, scoring lower
    window, start, end = answer_window_and_tokens(features, row)
    decoys = [
        index for index, example_id in enumerate(features["example_id"])
        if example_id == row["id"] and index != window
    ]
    assert min(decoys) < window < max(decoys)  # decoys both before and after the answer window
    for decoy in decoys:
        start_logits, end_logits = logits_pointing_at(features, [(window, start, end)])
        decoy_offsets = features[decoy]["offset_mapping"]
        last_context_token = max(k for k, offset in enumerate(decoy_offsets) if offset is not None)
        start_logits[decoy, last_context_token] = end_logits[decoy, last_context_token] = 9.0
        predictions = postprocess_qa_predictions(
            dev.select([0]), features, start_logits, end_logits
        )
        assert predictions == {row["id"]: "Denver Broncos"}, decoy


def test_logits_must_have_one_row_per_feature(dev_and_features):
    dev, features = dev_and_features
    expected = rf"start_logits has shape \(3, 40\); expected \({len(features)}, seq_len\)"
    with pytest.raises(ValueError, match=expected):
        postprocess_qa_predictions(dev, features, np.zeros((3, 40)), np.zeros((3, 40)))
