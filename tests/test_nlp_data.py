"""GLUE TSV readers, GLUE metrics on known values, instruction data and prompts, answer extractors."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

pytest.importorskip("transformers")

from neat_vision.nlp.answers import (  # noqa: E402
    extract_boxed,
    extract_choice,
    extract_math_answer,
    extract_number,
    get_evaluator,
    math_correct,
    number_correct,
    reference_answer,
)
from neat_vision.nlp.glue_data import TASKS, get_task, load_glue, read_tsv  # noqa: E402
from neat_vision.nlp.instruct_data import load_records, pad_batch, prompt, tokenize_record  # noqa: E402
from neat_vision.nlp.metrics import accuracy, f1, glue_metrics, mcc, pearson, spearman  # noqa: E402
from tests.nlp_fixtures import colour_records, instruct_vocabulary, make_tokenizer, write_glue  # noqa: E402

# --- GLUE data ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_glue_tsv_layouts_read_texts_and_labels(tmp_path, task):
    spec = get_task(task)
    write_glue(tmp_path, task, n_train=12, n_dev=6)
    train, dev = load_glue(spec, tmp_path)
    assert (len(train), len(dev)) == (12, 6)  # QQP's broken row is skipped
    for texts, label in train + dev:
        assert len(texts) == len(spec.text_fields) and all(t.split() for t in texts)
        if spec.is_regression:
            assert isinstance(label, float) and 0.0 <= label <= 5.0
        else:
            assert label in range(spec.num_labels)


def test_glue_tsv_reads_quotes_verbatim_and_maps_label_names(tmp_path):
    sst = tmp_path / "SST-2"
    sst.mkdir()
    (sst / "train.tsv").write_text('sentence\tlabel\nit \'s a "charming" movie \t1\n" quoted start\t0\n')
    assert read_tsv(TASKS["sst2"], sst / "train.tsv") == [
        (('it \'s a "charming" movie ',), 1),
        (('" quoted start',), 0),
    ]
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe more we study.\n")
    assert [label for _, label in read_tsv(TASKS["cola"], cola)] == [1, 0]
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n")
    assert read_tsv(TASKS["rte"], rte) == [(("a", "b"), 1), (("c", "d"), 0)]
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        read_tsv(TASKS["rte"], rte)
    with pytest.raises(ValueError, match="lacks the mrpc column"):
        read_tsv(TASKS["mrpc"], rte)
    with pytest.raises(ValueError, match="task='wnli' is not allowed"):
        get_task("wnli")
    with pytest.raises(FileNotFoundError, match="official layout"):
        load_glue(TASKS["mnli"], tmp_path)


def test_glue_from_the_datasets_library(monkeypatch):
    calls = []

    def load_dataset(name, task):
        calls.append((name, task))
        rows = {"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [2, 0], "idx": [0, 1]}
        return {"train": rows, "validation_matched": {k: v[:1] for k, v in rows.items()}}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, dev = load_glue(TASKS["mnli"], None)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert train == [(("a", "c"), 2), (("b", "d"), 0)] and dev == [(("a", "c"), 2)]
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="pass --data-dir"):
        load_glue(TASKS["mnli"], None)


def test_mnli_uses_gold_label_and_the_datasets_label_order(tmp_path):
    write_glue(tmp_path, "mnli", n_train=30, n_dev=10)
    rows = (tmp_path / "MNLI" / "dev_matched.tsv").read_text().splitlines()
    header, first = rows[0].split("\t"), rows[1].split("\t")
    assert header[-1] == "gold_label" and "label5" in header
    _, dev = load_glue(TASKS["mnli"], tmp_path)
    assert dev[0][1] == ["entailment", "neutral", "contradiction"].index(first[-1])
    assert dev[0][0] == (first[8], first[9])


# --- GLUE metrics ------------------------------------------------------------------------------------------------


def test_metrics_on_known_values():
    predictions, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    assert accuracy(predictions, labels) == 0.75
    assert f1(predictions, labels) == pytest.approx(0.8)  # P 2/3, R 1
    assert mcc(predictions, labels) == pytest.approx(2 / math.sqrt(12))  # (TP TN - FP FN) / sqrt(3 * 2 * 2 * 1)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(25 / math.sqrt(645))
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))  # tied ranks 1.5, 1.5, 3
    assert pearson([2, 2, 2], [1, 2, 3]) == 0.0 and mcc([1, 1, 1], [0, 1, 0]) == 0.0  # constant predictions
    assert set(glue_metrics("cola", predictions, labels)) == {"mcc"}
    assert glue_metrics("mrpc", predictions, labels) == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert set(glue_metrics("stsb", [0.1, 2.0, 4.5], [0.0, 2.5, 5.0])) == {"pearson", "spearman"}
    with pytest.raises(ValueError, match="task='wnli' is not allowed"):
        glue_metrics("wnli", predictions, labels)


# --- instruction data --------------------------------------------------------------------------------------------


def test_prompt_is_the_alpaca_template():
    assert prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert prompt("Translate.", "bonjour").endswith(
        "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n"
    )


def test_records_from_llm_adapters_metamath_and_math_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i", "input": "x", "output": "o", "answer": "true"}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"query": "q", "response": "r", "type": "GSM_AnsAug"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$"}]))
    assert load_records(tmp_path / "a.json") == [{"instruction": "i", "input": "x", "output": "o", "answer": "true"}]
    assert load_records(tmp_path / "b.jsonl") == [{"instruction": "q", "input": "", "output": "r", "answer": ""}]
    math_record = load_records(tmp_path / "c.json")[0]
    assert reference_answer(math_record) == "\\frac{1}{2}"
    (tmp_path / "d.json").write_text(json.dumps([{"text": "no instruction"}]))
    with pytest.raises(ValueError, match="record 0 has none of the instruction keys"):
        load_records(tmp_path / "d.json")


def test_tokenize_record_puts_the_loss_on_the_answer_only():
    records = colour_records(3)
    tokenizer = make_tokenizer(instruct_vocabulary(records), style="llama")
    record = records[0]
    features = tokenize_record(tokenizer, record, cutoff_len=256)
    user = tokenizer(prompt(record["instruction"]))["input_ids"]
    answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    assert features["input_ids"] == user + answer + [tokenizer.eos_token_id]
    assert features["labels"] == [-100] * len(user) + answer + [tokenizer.eos_token_id]
    cut = tokenize_record(tokenizer, record, cutoff_len=len(user) + 2)
    assert cut["input_ids"] == user + answer[:2] and cut["labels"][-2:] == answer[:2]  # cut: no EOS
    batch = pad_batch([features, cut], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(features["input_ids"]))
    padding = len(features["input_ids"]) - len(cut["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * len(cut["input_ids"]) + [0] * padding
    assert batch["input_ids"][1, -1] == tokenizer.pad_token_id and batch["labels"][1, -1] == -100


# --- answer extraction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "response", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false. it is not true", "false"),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "answer3 is right, not answer1", "answer3"),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("winogrande", "option2", "option2"),
        ("ARC-Challenge", "the correct answer is answer5", "answer5"),
        ("openbookqa", "I am not sure", ""),
    ],
)
def test_commonsense_choice_extraction(dataset, response, expected):
    assert extract_choice(dataset, response) == expected
    evaluator = get_evaluator(dataset)
    assert evaluator.max_new_tokens == 32
    assert evaluator.correct(evaluator.extract(response), expected) == bool(expected)


def test_gsm8k_takes_the_last_number():
    assert extract_number("He pays $1,234.5 for 3 items. The answer is: 1234.5") == 1234.5
    assert extract_number("it drops by -3 degrees") == -3.0
    assert extract_number("no numbers here") is None
    assert number_correct(18.0, "18") and number_correct(18.0005, "18") and not number_correct(18.01, "18")
    assert number_correct(1200.0, "she needs 1,000 + 200 = 1,200 apples\n#### 1,200")
    assert not number_correct(None, "18")
    evaluator = get_evaluator("gsm8k")
    assert evaluator.max_new_tokens == 256 and evaluator.correct(evaluator.extract("so 5 + 13 = 18"), "18")


def test_math_takes_the_boxed_answer_with_matched_braces():
    assert extract_boxed("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_boxed("the answer is $\\boxed 5$.") == "5"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed{\\frac{1}{2}") is None and extract_boxed("no box") is None
    assert extract_math_answer("The answer is: 3/4") == "3/4"
    assert math_correct("\\dfrac{1}{2}", "\\frac{1}{2}") and math_correct("10\\%", "10")
    assert math_correct("\\text{(A)}", "(A)") and math_correct("2.0", "2") and math_correct("90^\\circ", "90")
    assert math_correct("\\left( 1, 2 \\right)", "(1,2)") and math_correct("7.", "7")
    assert not math_correct("0.5", "\\frac{1}{2}") and not math_correct(None, "1")
    evaluator = get_evaluator("MATH")
    assert evaluator.max_new_tokens == 512 and evaluator.correct(
        evaluator.extract("\\boxed{\\dfrac{3}{4}}"), "\\frac{3}{4}"
    )
    with pytest.raises(ValueError, match="evaluation set 'mmlu' is not allowed"):
        get_evaluator("mmlu")
