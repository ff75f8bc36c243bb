"""Instruction data in the LLM-Adapters JSON format, its Alpaca prompt, and tokenization with answer-only labels.

A data file is a JSON list (or JSON lines) of records ``{"instruction", "input", "output"}``
(Commonsense170K, LLM-Adapters' ``dataset/<name>/test.json`` with an extra ``"answer"``). MetaMathQA's
``{"query", "response"}`` and MATH's ``{"problem", "solution"}`` records are read as instruction/output.

The prompt is the Alpaca template LLM-Adapters trains and evaluates with, without the indentation its
source's triple-quoted string carries into the text; the response follows ``### Response:\\n``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# record keys read as each field, in order of preference
FIELDS = {
    "instruction": ("instruction", "query", "problem", "question"),
    "input": ("input",),
    "output": ("output", "response", "solution"),
    "answer": ("answer",),
}


def prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record, ending where the response starts."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _field(record: Mapping[str, Any], name: str) -> str:
    for key in FIELDS[name]:
        if record.get(key) is not None:
            return str(record[key])
    return ""


def load_records(path: str | Path) -> list[dict[str, str]]:
    """Records of a JSON list or JSON-lines file as ``{instruction, input, output, answer}`` strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no instruction data at {path} (a JSON list of {{instruction, input, output}})")
    try:
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            raw = json.loads(text)
        else:
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON or JSON lines ({err}); expected a list of records") from err
    if not raw or not all(isinstance(r, Mapping) for r in raw):
        raise ValueError(f"{path}: expected a non-empty list of {{instruction, input, output}} records")
    records = [{name: _field(r, name) for name in FIELDS} for r in raw]
    for i, record in enumerate(records):
        if not record["instruction"]:
            raise ValueError(f"{path}: record {i} has none of the instruction keys {list(FIELDS['instruction'])}")
    return records


def tokenize_record(tokenizer: Any, record: Mapping[str, str], cutoff_len: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of prompt + output (+ EOS), cut at ``cutoff_len`` tokens.

    Labels are ``-100`` on the prompt tokens: the loss covers the answer only. EOS is appended when the text
    fits, as LLM-Adapters does.
    """
    user = prompt(record["instruction"], record["input"])
    ids = tokenizer(user + record["output"], truncation=True, max_length=cutoff_len)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(user, truncation=True, max_length=cutoff_len)["input_ids"])
    return {"input_ids": ids, "labels": [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]}


def pad_batch(features: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to the longest; add ``attention_mask``."""
    length = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), length), pad_id)
    labels = torch.full((len(features), length), -100)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.as_tensor(f["input_ids"])
        labels[row, :n] = torch.as_tensor(f["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
