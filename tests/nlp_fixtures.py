"""Tiny transformers models, tokenizers built offline, and data written in the real GLUE / LLM-Adapters formats.

Models are randomly initialised from small ``RobertaConfig`` / ``LlamaConfig``; tokenizers are word-level
``tokenizers`` models trained on the test's own text. Toy data carries a learnable signal: a sentiment
word decides the label (GLUE), a colour word decides the answer (instruction data).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, RobertaConfig, RobertaModel

from neat_vision.nlp.glue_data import TASKS
from neat_vision.nlp.instruct_data import PROMPT_NO_INPUT, PROMPT_WITH_INPUT


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from a second thread, and on shared cores the threads' spin-waits cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


POSITIVE = ["good", "great", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "plot", "actor", "was", "a", "story", "very", "and", "it", "is", "this", "film"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(texts: Iterable[str], style: str = "roberta") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``texts``: ``roberta`` (``<s> A </s></s> B </s>``) or ``llama`` (``<s> A``)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if style == "roberta":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        cls_token="<s>",
        sep_token="</s>",
    )


def roberta_config(vocab_size: int = 64, layers: int = 2, hidden: int = 32, **kwargs) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=80,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )


def llama_config(vocab_size: int = 64, layers: int = 2, hidden: int = 32, **kwargs) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **kwargs,
    )


def sentence(rng: random.Random, sentiment: int | None = None, length: int = 4) -> str:
    """Filler words and one sentiment word (positive when ``sentiment == 1``)."""
    words = rng.choices(FILLER, k=length - 1)
    if sentiment is not None:
        words.insert(rng.randrange(length), rng.choice(POSITIVE if sentiment else NEGATIVE))
    return " ".join(words)


def glue_vocabulary() -> list[str]:
    return [" ".join(POSITIVE + NEGATIVE + FILLER)]


def save_roberta_folder(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """A ``save_pretrained`` folder holding a tiny RoBERTa encoder and its tokenizer (what ``--model`` loads)."""
    tokenizer = make_tokenizer(glue_vocabulary())
    torch.manual_seed(seed)
    # a wide init (std 0.1, not 0.02) lets a random frozen encoder carry the toy signal to the head
    config = roberta_config(vocab_size=len(tokenizer), layers=layers, initializer_range=0.1)
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- GLUE TSV files, official layouts --------------------------------------------------------------------------

MNLI_LABELS = ["entailment", "neutral", "contradiction"]


def _glue_rows(task: str, rng: random.Random, n: int, dev: bool) -> tuple[list[str] | None, list[list[str]]]:
    rows = []
    for i in range(n):
        y, y2 = rng.randrange(2), rng.randrange(2)
        a, b = sentence(rng, y), sentence(rng, y2)
        same = int(y == y2)
        if task == "cola":
            rows.append(["gj04", str(y), "" if y else "*", a])
        elif task == "sst2":
            rows.append([a, str(y)])
        elif task == "mrpc":
            rows.append([str(same), str(1000 + i), str(2000 + i), a, b])
        elif task == "stsb":
            score = f"{4.0 * same + rng.random():.3f}"
            rows.append([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, score])
        elif task == "qqp":
            rows.append([str(i), str(2 * i), str(2 * i + 1), a, b, str(same)])
        elif task == "mnli":
            label = MNLI_LABELS[2 * (1 - same) if rng.random() < 0.8 else 1]
            parses = [f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})"]
            votes = [label] * (5 if dev else 1)
            rows.append([str(i), str(31193 + i), f"{31193 + i}n", "government", *parses, a, b, *votes, label])
        elif task in ("qnli", "rte"):
            rows.append([str(i), a, b, "entailment" if same else "not_entailment"])
    headers = {
        "cola": None,
        "sst2": ["sentence", "label"],
        "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        "stsb": "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
        "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        "mnli": "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
        "sentence2_parse sentence1 sentence2".split()
        + ([f"label{k}" for k in range(1, 6)] if dev else ["label1"])
        + ["gold_label"],
        "qnli": ["index", "question", "sentence", "label"],
        "rte": ["index", "sentence1", "sentence2", "label"],
    }
    return headers[task], rows


def write_glue(root: Path, task: str, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """``<root>/<Task>/train.tsv`` and the dev file in the official GLUE layout; returns ``root``."""
    spec = TASKS[task]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n, dev in (("train.tsv", n_train, False), (spec.dev_file, n_dev, True)):
        header, rows = _glue_rows(task, rng, n, dev)
        lines = ([header] if header else []) + rows
        if task == "qqp" and not dev:
            lines.append(["broken", "row"])  # QQP's train.tsv has a few rows with missing fields
        (folder / name).write_text("".join("\t".join(r) + "\n" for r in lines), encoding="utf-8")
    return root


# --- LLM-Adapters JSON ------------------------------------------------------------------------------------------

COLOURS = {"red": "answer1", "blue": "answer2"}


def colour_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """SIQA-style records whose answer is decided by a colour word (``red`` -> answer1, ``blue`` -> answer2)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        colour = rng.choice(sorted(COLOURS))
        context = " ".join(rng.choices(FILLER, k=3))
        instruction = (
            f"Please choose the correct answer to the question: {context} {colour} ? "
            "Answer1: yes Answer2: no Answer format: answer1/answer2"
        )
        answer = COLOURS[colour]
        records.append(
            {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}
        )
    return records


def number_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """GSM8K-style records (LLM-Adapters' test format: the answer a number string)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(
            {
                "instruction": f"what is {a} plus {b} ?",
                "input": "",
                "output": f"the answer is {a + b}",
                "answer": str(a + b),
            }
        )
    return out


def instruct_vocabulary(records: Iterable[dict[str, str]]) -> list[str]:
    texts = [PROMPT_WITH_INPUT, PROMPT_NO_INPUT, " ".join(str(i) for i in range(20))]
    for r in records:
        texts += [r["instruction"], r["input"], r["output"]]
    return texts


def write_json(path: Path, records: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def save_llama_folder(folder: Path, records: list[dict[str, str]], layers: int = 2, seed: int = 0) -> Path:
    """A ``save_pretrained`` folder holding a tiny LLaMA and a tokenizer covering ``records``."""
    tokenizer = make_tokenizer(instruct_vocabulary(records), style="llama")
    torch.manual_seed(seed)
    # a wide init (std 0.2, not 0.02) gives the frozen random LM head logits the tweakers can steer
    config = llama_config(vocab_size=len(tokenizer), layers=layers, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_saved(one: Path, two: Path) -> None:
    """The ``.safetensors`` files of two saved folders (adapter, head or model) hold the same tensors."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in one.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in two.glob("*.safetensors"))
    for name in names:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
