"""NEAT on transformers models: presets, heads, adapter files, merge, Trainer, checkpointing, bf16, param counts."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from neat_vision import (  # noqa: E402
    AdapterMismatchError,
    ConfigError,
    NeatConfig,
    TargetError,
    adapted_layers,
    merge_and_unload,
    read_adapter_config,
    save_adapter,
    trainable_summary,
)
from neat_vision.nlp import apply_neat, load_adapter  # noqa: E402
from tests.nlp_fixtures import (  # noqa: E402
    llama_config,
    roberta_config,
    single_thread,  # noqa: F401 (an autouse fixture)
)


def roberta(layers: int = 2, num_labels: int = 3, seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(roberta_config(layers=layers, num_labels=num_labels)).eval()


def llama_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).eval()


def randomise_updates(model: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero (dW = 0): give every tweaker a non-trivial update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for update in layer.updates:
                update.B.copy_(torch.randn(update.B.shape, generator=gen) * 0.3)


def ids(batch: int = 2, length: int = 9, vocab: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


def suffixes(model: torch.nn.Module) -> list[str]:
    return [name.split(".layer.")[-1].split(".layers.")[-1] for name in adapted_layers(model)]


def test_bert_preset_aliases_pick_the_right_modules():
    model = apply_neat(roberta(layers=1), NeatConfig(targets=["q", "k", "v", "o", "up", "down"], rank=2))
    assert suffixes(model) == [
        "0.attention.self.query",
        "0.attention.self.key",
        "0.attention.self.value",
        "0.attention.output.dense",
        "0.intermediate.dense",
        "0.output.dense",
    ]
    down_only = apply_neat(roberta(layers=1), NeatConfig(targets=["down"], rank=2))
    assert suffixes(down_only) == ["0.output.dense"]  # not the attention's output.dense, not the head's dense


def test_llama_preset_aliases_and_lm_head_frozen():
    model = apply_neat(llama_lm(), NeatConfig(targets=["q", "k", "v", "up", "down"], rank=2))
    assert suffixes(model)[:5] == [
        "0.self_attn.q_proj",
        "0.self_attn.k_proj",
        "0.self_attn.v_proj",
        "0.mlp.up_proj",
        "0.mlp.down_proj",
    ]
    assert len(adapted_layers(model)) == 10
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".updates." in n for n in trainable)  # lm_head and embeddings stay frozen
    asked = apply_neat(llama_lm(), NeatConfig(targets="o", rank=2), head=["lm_head"])
    assert asked.lm_head.weight.requires_grad


def test_sequence_classification_heads_are_trainable():
    model = apply_neat(roberta(), NeatConfig(rank=2))
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert trainable_summary(model)["head"] == sum(p.numel() for p in model.classifier.parameters())
    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(llama_config(num_labels=2))
    apply_neat(llama, NeatConfig(rank=2))
    assert llama.score.weight.requires_grad
    frozen = apply_neat(roberta(), NeatConfig(rank=2, train_head=False))
    assert not any(p.requires_grad for p in frozen.classifier.parameters())


def test_neat_s_selects_only_layers_4_to_11():
    model = apply_neat(roberta(layers=12), NeatConfig(targets=["q", "v"], rank=1, layers=range(4, 12)))
    layers = sorted({int(name.split(".layer.")[1].split(".")[0]) for name in adapted_layers(model)})
    assert layers == list(range(4, 12))
    assert len(adapted_layers(model)) == 16
    assert trainable_summary(model)["neat"] == 8 * 2 * (2 * 1 * 32)


def test_presets_and_targets_fail_clearly():
    with pytest.raises(ConfigError, match="preset='gpt'.*bert, llama"):
        apply_neat(roberta(), NeatConfig(rank=2), preset="gpt")
    with pytest.raises(TargetError, match="'up_proj' matches no linear or conv layer"):
        apply_neat(roberta(), NeatConfig(targets="up_proj", rank=2))
    plain = apply_neat(roberta(), NeatConfig(targets=["query", r".*\.value"], rank=2))  # names work without aliases
    assert len(adapted_layers(plain)) == 4


def test_adapter_round_trip_gives_the_same_logits(tmp_path):
    cfg = NeatConfig(targets=["q", "v", "down"], rank=3, depth=4, act="gelu", scale=0.5)
    model = apply_neat(roberta(), cfg)
    randomise_updates(model)
    with torch.no_grad():
        model.classifier.out_proj.bias.add_(0.5)
        expected = model(ids()).logits
    save_adapter(model, tmp_path / "adapter")
    meta = read_adapter_config(tmp_path / "adapter")
    assert meta["base"] == {
        "library": "transformers",
        "model_name": None,
        "model_class": "RobertaForSequenceClassification",
        "model_type": "roberta",
        "num_labels": 3,
    }
    fresh = roberta(seed=0)  # the same base weights
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(ids()).logits, expected)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(roberta(seed=5), tmp_path / "adapter")


def test_load_adapter_builds_the_recorded_model_from_its_folder(tmp_path):
    base = roberta()
    base.save_pretrained(tmp_path / "base")
    model = RobertaForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    apply_neat(model, NeatConfig(rank=2))
    randomise_updates(model)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(None, tmp_path / "adapter").eval()
    assert type(loaded) is RobertaForSequenceClassification and loaded.config.num_labels == 3
    torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)


def test_merge_and_unload_exports_a_plain_transformers_model(tmp_path):
    model = apply_neat(llama_lm(), NeatConfig(targets=["q", "v", "up", "down"], rank=2, axis="in"))
    randomise_updates(model)
    with torch.no_grad():
        expected = model(ids()).logits
    model.save_pretrained(tmp_path / "adapted")  # an adapted model still saves (tweakers as extra keys)
    merge_and_unload(model)
    assert not adapted_layers(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(reloaded(ids()).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = apply_neat(llama_lm(), NeatConfig(targets=["q", "v", "down"], rank=2))
        randomise_updates(model)
        model.train()  # LLaMA has no dropout: train mode is deterministic
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert all(g is not None for g in checkpointed.values())
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6)


def test_bf16_base_trains_with_fp32_tweakers():
    model = llama_lm().to(torch.bfloat16)
    apply_neat(model, NeatConfig(targets=["q", "v", "up"], rank=2))
    randomise_updates(model)
    update = next(iter(adapted_layers(model).values())).updates[0]
    assert update.A.dtype == torch.float32 and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(update.A.grad).all() and update.A.grad.abs().sum() > 0


def test_hf_trainer_trains_only_the_tweakers_and_head(tmp_path):
    model = apply_neat(roberta(), NeatConfig(rank=2))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": i % 3} for i, row in enumerate(ids(8))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def test_trainer_save_model_reloads_with_from_pretrained_and_plain_loading_warns(tmp_path):
    from neat_vision.nlp import from_pretrained

    model = apply_neat(roberta(), NeatConfig(rank=2, depth=4, act="sin"))
    randomise_updates(model)
    with torch.no_grad():  # a trained head too
        model.classifier.out_proj.bias.add_(0.5)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args).save_model(str(tmp_path / "saved"))
    reloaded = from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is RobertaForSequenceClassification and reloaded.neat_config == model.neat_config
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, model(ids()).logits, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"does not load: this is the base model.*neat_vision\.nlp\.from_pretrained"):
        plain = RobertaForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert not adapted_layers(plain)
    merge_and_unload(reloaded).save_pretrained(tmp_path / "merged")  # the record goes with the adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        RobertaForSequenceClassification.from_pretrained(tmp_path / "merged")
    with pytest.raises(AdapterMismatchError, match="holds no neat-vision adapter"):
        from_pretrained(tmp_path / "merged")


def test_roberta_base_parameter_counts_match_the_paper_budgets():
    """RoBERTa-base from ``RobertaConfig()`` on the meta device (no weights): NEAT-S and NEAT-L counts."""
    counts = {}
    for variant, cfg in {"S": NeatConfig(rank=1, layers=range(4, 12)), "L": NeatConfig(rank=8)}.items():
        with torch.device("meta"):
            model = RobertaForSequenceClassification(RobertaConfig(num_labels=2))
        counts[variant] = trainable_summary(apply_neat(model, cfg))
    s, big = counts["S"], counts["L"]
    assert (s["neat"], big["neat"]) == (24_576, 294_912)  # 8 x 2 x 2*1*768 and 12 x 2 x 2*8*768 = LoRA r 8's count
    assert s["head"] == big["head"] == 592_130
    base = s["total"] - s["neat"]
    assert base == 124_646_402
    assert round(100 * s["neat"] / base, 4) == 0.0197  # paper: 0.019% (FourierFT's 24,000 params)
    assert round(100 * big["neat"] / base, 4) == 0.2366  # paper: 0.239% (LoRA's count, taken from Wu et al.)
    assert round(100 * big["neat"] / (base - big["head"]), 4) == 0.2377  # denominator without the head


def test_import_neat_vision_works_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import neat_vision\n"
        "assert not any(m.startswith('transformers') for m in sys.modules if sys.modules[m] is not None)\n"
        "try:\n    import neat_vision.nlp\nexcept ImportError as err:\n    print(err)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert 'neat_vision.nlp needs transformers: pip install -e ".[nlp]"' in out.stdout
