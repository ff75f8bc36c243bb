"""GLUE data: the eight tasks' texts and labels, from the ``datasets`` library or the official GLUE TSV files.

TSV layout (what GLUE's ``download_glue_data.py`` writes): ``<data_dir>/<Task>/train.tsv`` and ``dev.tsv``
(MNLI: ``dev_matched.tsv``), tab-separated, no quoting. Every file has a header except CoLA's, whose
columns are ``source, label, original label, sentence``. Rows with fewer fields than the header (QQP has a
few) are skipped. Labels are numbered as in the ``datasets`` library's ``glue`` builder, so both sources
give the same label ids.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

GLUE_HF_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its texts and label live in each source and how labels are numbered."""

    name: str
    folder: str
    text_fields: tuple[str, ...]  # datasets columns
    tsv_fields: tuple[str | int, ...]  # TSV text columns then the label column: header names, or indices
    label_names: tuple[str, ...] | None  # ``None`` for regression (STS-B)
    dev_file: str = "dev.tsv"
    dev_split: str = "validation"

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


NLI = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", ("sentence",), (3, 1), ("unacceptable", "acceptable")),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), ("sentence", "label"), ("negative", "positive")),
    "mrpc": GlueTask(
        "mrpc",
        "MRPC",
        ("sentence1", "sentence2"),
        ("#1 String", "#2 String", "Quality"),
        ("not_equivalent", "equivalent"),
    ),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), None),
    "qqp": GlueTask(
        "qqp",
        "QQP",
        ("question1", "question2"),
        ("question1", "question2", "is_duplicate"),
        ("not_duplicate", "duplicate"),
    ),
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        ("premise", "hypothesis"),
        ("sentence1", "sentence2", "gold_label"),
        ("entailment", "neutral", "contradiction"),
        dev_file="dev_matched.tsv",
        dev_split="validation_matched",
    ),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence", "label"), NLI),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2", "label"), NLI),
}

Example = tuple[tuple[str, ...], float | int]  # (texts, label)


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (``cola``, ``sst2``, ``mrpc``, ``stsb``, ``qqp``, ``mnli``, ``qnli``, ``rte``)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not allowed: one of {', '.join(TASKS)}")
    return TASKS[name]


def _label(task: GlueTask, value: str, where: str) -> float | int:
    if task.is_regression:
        return float(value)
    if value in task.label_names:
        return task.label_names.index(value)
    if value.isdigit() and int(value) < task.num_labels:
        return int(value)
    raise ValueError(f"{where}: label {value!r} is not one of {list(task.label_names)} or 0..{task.num_labels - 1}")


def read_tsv(task: GlueTask, path: str | Path) -> list[Example]:
    """The examples of one GLUE TSV file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GLUE file {path} (expected the official layout <data_dir>/{task.folder}/...)")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if all(isinstance(c, int) for c in task.tsv_fields):
        columns, width, body = list(task.tsv_fields), max(task.tsv_fields) + 1, rows
    else:
        header = rows[0]
        missing = [c for c in task.tsv_fields if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks the {task.name} column(s) {missing}")
        columns, width, body = [header.index(c) for c in task.tsv_fields], len(header), rows[1:]
    examples = []
    for line, row in enumerate(body, start=len(rows) - len(body) + 1):
        if len(row) < width:
            continue
        texts = tuple(row[c] for c in columns[:-1])
        examples.append((texts, _label(task, row[columns[-1]], f"{path}:{line}")))
    return examples


def load_glue(task: GlueTask, data_dir: str | Path | None) -> tuple[list[Example], list[Example]]:
    """``(train, dev)`` examples: from ``data_dir`` when given, else from the ``datasets`` library."""
    if data_dir is not None:
        folder = Path(data_dir) / task.folder
        return read_tsv(task, folder / "train.tsv"), read_tsv(task, folder / task.dev_file)
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(
            "no GLUE data: pass --data-dir (the official GLUE TSV layout) or install the datasets library"
        ) from None
    splits = load_dataset(GLUE_HF_NAME, task.name)

    def examples(split: str) -> list[Example]:
        rows = splits[split]
        return list(zip(zip(*(rows[k] for k in task.text_fields)), rows["label"]))

    return examples("train"), examples(task.dev_split)
