"""GLUE runner: NEAT (or LoRA, FourierFT, linear, full) on a sequence classifier (default ``roberta-base``).

    neat-glue --config glue/cola_neat_l [--data-dir glue_data]     # or python -m neat_vision.nlp.glue

The configs hold the paper's Tables 8/9 settings. ``--method`` picks what trains: ``neat`` (default), ``lora`` or
``fourierft`` on the same ``--neat-targets`` / ``--neat-layers``, ``linear`` (the classifier head only) or
``full`` (every weight). Trains the update parameters (``--lr``; with ``full`` the encoder's weights) and the
classifier head (``--head-lr``) with AdamW and a linear schedule
with ``--warmup-ratio`` warmup, evaluates on the dev set (MNLI: matched) after every epoch and keeps the
best epoch's adapter in ``<output>/best`` (``linear`` / ``full``: ``head.safetensors`` / ``model.safetensors``
with ``export.json``, as train.py writes them). Writes ``results.json`` (best and per-epoch dev metrics),
``summary.csv``, TensorBoard events in ``tb/`` and ``checkpoint.pt`` (``--resume`` continues it). Exit
code 0 on success, 2 on a bad setting or file (one ``error:`` line), 3 when the run diverged (non-finite loss,
gradients or weights; the last good checkpoint is kept).

    torchrun --nproc_per_node 4 -m neat_vision.nlp.glue --config ...   # DDP; --batch-size stays the global batch

Under torchrun each rank trains on its shard of every batch and evaluates every N-th dev batch (the
predictions are gathered, so the metrics are those of the whole dev set); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from ..adapter import apply_method, trainable_summary
from ..atomic import atomic_write_text
from ..engine.distributed import DistEnv, all_gather_object, setup_distributed
from ..errors import OneLineParser
from ..integrations.transformers import apply_adapter, load_tokenizer
from .cli import (
    DTYPES,
    add_common_arguments,
    load_pretrained,
    method_config_for,
    parse_args,
    run_main,
)
from .glue_data import TASKS, Example, get_task, load_glue
from .loop import (
    TextTask,
    check_output,
    distribute,
    make_optimizer,
    prepare_model,
    seed_rank,
    train_text,
)
from .metrics import TASK_METRICS, glue_metrics, primary_metric

METHODS = ("neat", "lora", "fourierft", "linear", "full")  # --method: linear trains the classifier head only


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="neat-glue", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, METHODS)
    parser.add_argument("--task", choices=list(TASKS))
    parser.add_argument("--data-dir", help="GLUE TSV folder (<data-dir>/CoLA/train.tsv, ...); default: datasets")
    parser.add_argument(
        "--head-lr", "--lr-head", type=float, help="learning rate of the classifier head (default: --lr)"
    )
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example (truncation)")
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    parser.set_defaults(model="roberta-base")
    return parser


def _encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[dict[str, object]]:
    columns = list(zip(*(texts for texts, _ in examples)))
    encoded = tokenizer(*columns, truncation=True, max_length=max_length)
    features = [{key: encoded[key][i] for key in encoded} for i in range(len(examples))]
    for feature, (_, label) in zip(features, examples):
        feature["labels"] = label
    return features


def train_glue(args: argparse.Namespace, env: DistEnv | None = None) -> dict[str, object]:
    """Run one GLUE fine-tuning described by parsed ``args``; return the results (also in results.json).

    ``env`` is this process's place in a torchrun job (`setup_distributed`); default: alone on ``--device``.
    """
    task = get_task(args.task)
    check_output(args.output, args.resume)
    env = env or setup_distributed(args.device)
    device = env.device
    dtype = DTYPES[args.dtype]
    train_examples, dev_examples = load_glue(task, args.data_dir)
    torch.manual_seed(args.seed)

    tokenizer = load_pretrained(load_tokenizer, args.tokenizer or args.model)
    model = load_pretrained(
        AutoModelForSequenceClassification.from_pretrained,
        args.model,
        num_labels=task.num_labels,
        **({"dtype": dtype} if dtype is not None else {}),
    )
    if model.config.pad_token_id is None:  # decoder-only classifiers find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    apply_method(model, args.method, method_config_for(args, model), apply=apply_adapter)
    model = prepare_model(model, device=device, dtype=dtype, gradient_checkpointing=args.gradient_checkpointing)
    net = distribute(model, env)
    seed_rank(args.seed, env)

    train = _encode(tokenizer, train_examples, args.max_length)
    dev = _encode(tokenizer, dev_examples, args.max_length)
    label_dtype = torch.float32 if task.is_regression else torch.long

    def forward(features: Sequence[dict[str, object]], module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
        logits = module(**batch.to(device)).logits.float()
        labels = torch.tensor([f["labels"] for f in features], dtype=label_dtype, device=device)
        return logits, labels

    def loss_fn(indices: list[int]) -> tuple[torch.Tensor, int]:
        logits, labels = forward([train[i] for i in indices], net)
        if task.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels, reduction="sum"), len(indices)
        return F.cross_entropy(logits, labels, reduction="sum"), len(indices)

    eval_batch = args.eval_batch_size or args.batch_size

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        mine = {}  # dev batch number -> (predictions, labels); batch b is rank b % world_size's
        for b, start in enumerate(range(0, len(dev), eval_batch)):
            if b % env.world_size == env.rank:
                logits, batch_labels = forward(dev[start : start + eval_batch], model)
                predictions = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
                mine[b] = (predictions.cpu(), batch_labels.cpu())
        gathered = {b: pair for part in all_gather_object(mine, env) for b, pair in part.items()}
        predictions, labels = zip(*(gathered[b] for b in sorted(gathered)))
        return glue_metrics(task.name, torch.cat(predictions).numpy(), torch.cat(labels).numpy())

    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    optimizer = make_optimizer(model, args.lr, args.head_lr, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * steps), steps)
    metric = primary_metric(task.name)
    text_task = TextTask(args, env, model, net, optimizer, scheduler, n_train=len(train), loss_fn=loss_fn)
    progress = train_text(text_task, evaluate, select_metric=metric)
    results = {
        "task": task.name,
        "method": args.method,
        "metric": metric,
        "best": progress.best,
        "history": progress.history,
        "params": trainable_summary(model),
        "train_examples": len(train),
        "dev_examples": len(dev),
    }
    if env.is_main:
        atomic_write_text(Path(args.output) / "results.json", json.dumps(results, indent=2))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = parse_args(build_parser(), argv, required=("task", "lr", "batch_size", "epochs", "output"))
    code, results = run_main(train_glue, args)
    if results is None:
        return code
    best = results["best"]
    scores = ", ".join(f"{k} {best[k]:.4f}" for k in TASK_METRICS[args.task])
    print(f"{args.task}: best epoch {best['epoch']}: {scores} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
