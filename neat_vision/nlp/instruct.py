"""Instruction-tuning runner: NEAT (or LoRA, FourierFT, full) on a causal LM (LLaMA-class), Commonsense170K /
MetaMathQA, paper Tables 10/11.

    neat-instruct --config instruct/commonsense \\
        --model meta-llama/Llama-2-7b-hf --data commonsense_170k.json --eval-dir LLM-Adapters/dataset

``--method`` picks what trains: ``neat`` (default), ``lora`` or ``fourierft`` on the same ``--neat-targets`` /
``--neat-layers``, or ``full`` (every weight; ``last/`` is then a ``from_pretrained`` folder). There is no
``linear``: a causal LM has no task head, and its pretrained vocabulary head is no linear probe (training it alone
would retrain a ``vocab x hidden`` matrix, tied to the input embeddings in many models).
Trains on the answer tokens of Alpaca-prompted records (LLM-Adapters JSON), AdamW with a linear schedule
after ``--warmup-steps``, then answers each evaluation set (``<eval-dir>/<name>/test.json``) by generation
and scores it (`neat_vision.nlp.answers`). ``--val-size`` records are held out for a validation loss after
each epoch (the lowest one's adapter goes to ``best/``); the evaluation uses the final adapter (``last/``),
merged into the base weights so that generating costs what the base model costs.
``--eval-only --adapter DIR`` evaluates a trained adapter (or a ``full`` run's folder). Writes ``results.json``,
``eval/<name>.json`` (every response and prediction), ``summary.csv``, ``tb/`` and ``checkpoint.pt`` (``--resume``).
Exit code 0 on success, 2 on a bad setting or file (one ``error:`` line), 3 when the run diverged (non-finite
loss, gradients or weights; the last good checkpoint is kept).

    torchrun --nproc_per_node 4 -m neat_vision.nlp.instruct --config ...   # DDP; --batch-size stays global

Under torchrun each rank trains on its shard of every batch, computes the validation loss of every N-th
micro-batch and answers every N-th evaluation batch (sums and rows are gathered, so the results are those
of the whole sets); rank 0 writes the files. ``--fsdp`` shards the model with FSDP2 (each decoder layer and
the root) for models that do not fit one GPU; it trains only (evaluate ``<output>/last`` with ``--eval-only``),
and its checkpoint and adapters hold the full tensors, as without it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from ..adapter import apply_method, merge_and_unload, trainable_summary
from ..atomic import atomic_write_text
from ..engine.distributed import DistEnv, all_gather_object, all_reduce_sum, setup_distributed
from ..errors import OneLineParser
from ..integrations.transformers import apply_adapter, load_tokenizer
from .answers import get_evaluator, reference_answer
from .cli import (
    DTYPES,
    add_common_arguments,
    load_pretrained,
    method_config_for,
    parse_args,
    run_main,
)
from .instruct_data import load_records, pad_batch, prompt, tokenize_record
from .loop import (
    TextTask,
    check_output,
    distribute,
    load_trained,
    make_optimizer,
    prepare_model,
    seed_rank,
    train_text,
)

# --method: no linear (a causal LM has no task head; its vocabulary head is part of the pretrained model)
METHODS = ("neat", "lora", "fourierft", "full")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="neat-instruct", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, METHODS)
    parser.add_argument("--data", help="training records: JSON list or JSON lines of {instruction, input, output}")
    parser.add_argument("--micro-batch-size", type=int, help="examples per forward pass (default: --batch-size)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--cutoff-len", type=int, default=256, help="tokens per example (truncation)")
    parser.add_argument("--val-size", type=int, default=0, help="records held out for a validation loss")
    parser.add_argument("--eval-dir", help="folder of evaluation sets: <eval-dir>/<name>/test.json")
    parser.add_argument("--eval-sets", nargs="*", default=[], help="names: boolq, piqa, ..., gsm8k, MATH")
    parser.add_argument("--eval-limit", type=int, help="evaluate only the first N records of each set")
    parser.add_argument("--max-new-tokens", type=int, help="generation budget (default: per set, the paper's)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate --adapter")
    parser.add_argument("--adapter", help="adapter folder (or a full run's folder) to evaluate with --eval-only")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun; trains only)")
    return parser


def _eval_file(eval_dir: str, name: str) -> Path:
    for file in ("test.json", "test.jsonl"):
        path = Path(eval_dir) / name / file
        if path.is_file():
            return path
    raise FileNotFoundError(f"no evaluation set {name!r}: expected {Path(eval_dir) / name}/test.json")


@torch.no_grad()
def evaluate_set(
    model: Any,
    tokenizer: Any,
    name: str,
    records: Sequence[dict[str, str]],
    *,
    max_new_tokens: int | None,
    num_beams: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    env: DistEnv | None = None,
) -> dict[str, Any]:
    """Answer ``records`` by generation (left-padded batches, greedy or beam search) and score them.

    Under torchrun batch ``b`` is answered by rank ``b % world_size`` and every rank returns all the rows.
    """
    evaluator = get_evaluator(name)
    device = next(model.parameters()).device
    model.eval()
    mine: dict[int, list[dict[str, Any]]] = {}
    for b, start in enumerate(range(0, len(records), batch_size)):
        if env is not None and b % env.world_size != env.rank:
            continue
        batch = records[start : start + batch_size]
        rows = mine.setdefault(b, [])
        prompts = [prompt(r["instruction"], r["input"]) for r in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens or evaluator.max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        responses = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for record, response in zip(batch, responses):
            answer = reference_answer(record)
            prediction = evaluator.extract(response)
            ok = bool(evaluator.correct(prediction, answer))
            rows.append({**record, "response": response, "prediction": prediction, "correct": ok})
    parts = all_gather_object(mine, env) if env is not None else [mine]
    gathered = {b: batch_rows for part in parts for b, batch_rows in part.items()}
    rows = [row for b in sorted(gathered) for row in gathered[b]]
    correct = sum(row["correct"] for row in rows)
    return {"accuracy": correct / max(len(records), 1), "correct": correct, "total": len(records), "rows": rows}


def run_instruct(args: argparse.Namespace, env: DistEnv | None = None) -> dict[str, Any]:
    """Train (unless ``--eval-only``) and evaluate as ``args`` describe; return the results (also results.json).

    ``env`` is this process's place in a torchrun job (`setup_distributed`); default: alone on ``--device``.
    """
    for name in args.eval_sets:
        get_evaluator(name)  # an unknown set fails now, not after training
    if args.eval_sets and not args.eval_dir:
        raise ValueError("--eval-sets needs --eval-dir (the folder of <name>/test.json); --eval-sets alone skips them")
    eval_files = {name: _eval_file(args.eval_dir, name) for name in args.eval_sets}
    if args.fsdp and (args.eval_only or args.eval_sets):
        raise ValueError(
            "--fsdp trains only: leave out --eval-sets / --eval-only and evaluate <output>/last afterwards with "
            "--eval-only --adapter (DDP or one process)"
        )
    if args.eval_only and not args.adapter:
        raise ValueError("--eval-only needs --adapter (a folder written by a training run, e.g. <output>/last)")
    if not args.eval_only:
        missing = [
            f"--{k.replace('_', '-')}" for k in ("data", "lr", "batch_size", "epochs") if getattr(args, k) is None
        ]
        if missing:
            raise ValueError(f"missing setting(s) {', '.join(missing)} for training (or --eval-only --adapter DIR)")
        check_output(args.output, args.resume)
    env = env or setup_distributed(args.device)
    device = env.device
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    tokenizer = load_pretrained(load_tokenizer, args.tokenizer or args.model)
    model = load_pretrained(
        AutoModelForCausalLM.from_pretrained, args.model, **({"dtype": dtype} if dtype is not None else {})
    )
    out = Path(args.output)
    results: dict[str, Any] = {}
    if args.eval_only:
        load_trained(model, args.adapter)
        model = prepare_model(model, device=device, dtype=dtype, gradient_checkpointing=False)
    else:
        apply_method(model, args.method, method_config_for(args, model), apply=apply_adapter)
        place = torch.device("cpu") if args.fsdp else device  # FSDP moves each rank's shard to its device
        model = prepare_model(model, device=place, dtype=dtype, gradient_checkpointing=args.gradient_checkpointing)
        results = _train(model, tokenizer, args, env)
    results["params"] = trainable_summary(model)
    if eval_files:
        merge_and_unload(model)  # generation then costs what the base model costs
    results["eval"] = {}
    for name, path in eval_files.items():
        scored = evaluate_set(
            model,
            tokenizer,
            name,
            load_records(path)[: args.eval_limit],
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            batch_size=args.eval_batch_size,
            autocast_dtype=dtype,
            env=env,
        )
        rows = scored.pop("rows")
        if env.is_main:
            (out / "eval").mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "eval" / f"{name}.json", json.dumps(rows, indent=2))
        results["eval"][name] = scored
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def _train(model: Any, tokenizer: Any, args: argparse.Namespace, env: DistEnv) -> dict[str, Any]:
    records = load_records(args.data)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed)).tolist()
    features = []  # int32 tensors: a tenth of the memory of lists for MetaMathQA's 395K records
    for i in order:
        tokens = tokenize_record(tokenizer, records[i], args.cutoff_len)
        features.append({key: torch.tensor(value, dtype=torch.int32) for key, value in tokens.items()})
    val, train = features[: args.val_size], features[args.val_size :]
    device = env.device
    model.config.use_cache = False
    net = distribute(model, env, fsdp=args.fsdp)
    seed_rank(args.seed, env)

    def loss_sum(
        batch_features: Sequence[dict[str, torch.Tensor]], module: torch.nn.Module = net
    ) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(device) for k, v in pad_batch(batch_features, tokenizer.pad_token_id).items()}
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return loss, int((targets != -100).sum())

    micro = args.micro_batch_size or args.batch_size

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, answer tokens
        for b, start in enumerate(range(0, len(val), micro)):
            if args.fsdp or b % env.world_size == env.rank:  # FSDP's forward is a collective: all ranks run all
                loss, n = loss_sum(val[start : start + micro], model)
                sums += torch.stack([loss.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
        total, terms = (sums if args.fsdp else all_reduce_sum(sums, env)).tolist()
        return {"val_loss": total / max(terms, 1)}

    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    optimizer = make_optimizer(model, args.lr, None, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, steps)

    def train_loss(indices: list[int]) -> tuple[torch.Tensor, int]:
        return loss_sum([train[i] for i in indices])

    text_task = TextTask(
        args, env, model, net, optimizer, scheduler, n_train=len(train), loss_fn=train_loss, micro=micro
    )
    progress = train_text(
        text_task, evaluate if val else None, select_metric="val_loss" if val else None, maximize=False
    )
    model.config.use_cache = True
    return {
        "method": args.method,
        "history": progress.history,
        "best": progress.best,
        "train_examples": len(train),
        "val_examples": len(val),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = parse_args(build_parser(), argv, required=("model", "output"))
    code, results = run_main(run_instruct, args)
    if results is None:
        return code
    for name, scored in results["eval"].items():
        print(f"{name}: accuracy {scored['accuracy']:.4f} ({scored['correct']}/{scored['total']})")
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
