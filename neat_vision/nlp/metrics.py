"""GLUE metrics: Matthews correlation (CoLA), Pearson/Spearman (STS-B), accuracy and F1 (MRPC, QQP), accuracy.

The primary metric of each task (the one "best dev score over epochs" maximises) follows the authors' GLUE
script: MCC for CoLA, Pearson for STS-B, accuracy for every other task (F1 is reported alongside for MRPC
and QQP). Correlations of a constant prediction are undefined; they count as ``0.0`` (as sklearn's MCC does).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import f1_score, matthews_corrcoef

# task -> metric names, the primary first
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class ``1``."""
    return float(f1_score(labels, predictions, pos_label=1, zero_division=0))


def mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (``0.0`` when either side is constant)."""
    return float(matthews_corrcoef(labels, predictions))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation (``0.0`` when either side is constant)."""
    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    return pearson(rankdata(predictions), rankdata(labels))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics: class indices (or scores for ``stsb``) against the labels."""
    if task not in TASK_METRICS:
        raise ValueError(f"task={task!r} is not allowed: one of {', '.join(TASK_METRICS)}")
    return {name: METRICS[name](predictions, labels) for name in TASK_METRICS[task]}


def primary_metric(task: str) -> str:
    """The metric that selects the best epoch."""
    return TASK_METRICS[task][0]
