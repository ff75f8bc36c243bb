"""Export a trained adapter as the plain merged model: ``neat-export --adapter DIR --output OUT``.

timm bases: ``OUT/model.safetensors`` + ``OUT/config.json`` in the layout of a timm Hugging Face hub repository,
written by timm's own ``save_for_hf`` (``architecture``, ``num_classes``, ``label_names``, ``model_args``, and a
``pretrained_cfg`` holding the eval data config the adapter was trained with). timm loads it with
``timm.create_model("local-dir:OUT", pretrained=True)``, or
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="OUT/model.safetensors",
num_classes=N), num_classes=N)`` (timm drops a checkpoint's head unless the overlay's ``num_classes`` is the
model's), or through ``timm.models.load_checkpoint`` as its ``validate.py`` and ``inference.py`` do with
``--checkpoint OUT/model.safetensors --num-classes N``. Uploading ``OUT`` to the hub makes it an
``hf-hub:`` model. transformers bases: ``save_pretrained`` of the merged model (and of the base's tokenizer when
it has one), loadable with the ``from_pretrained`` of the same class.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neat_vision.adapter import merge_and_unload
from neat_vision.adapter_files import AdapterMismatchError
from neat_vision.atomic import DiskWriteError, disk_write_error
from neat_vision.tools.trained import DATA_CONFIG_OPTIONS, Trained, console_script, open_adapter, run_tool, tool_parser

__all__ = ["export_adapter", "export_timm", "export_transformers", "main"]

logger = logging.getLogger("neat_vision.tools.export")

# the data config keys that the exported pretrained_cfg carries (what timm's scripts read to preprocess)
PRETRAINED_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def export_timm(trained: Trained, output: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Merge ``trained`` into its plain timm model and write it with timm's ``save_for_hf`` (safetensors)."""
    from timm.models import save_for_hf

    config = trained.data_config(overrides)
    model = merge_and_unload(trained.model).cpu()
    names = trained.class_names
    # timm's exporter describes the model from model.pretrained_cfg: make it describe these weights
    # (the label names go to the top level of config.json, where timm's loaders read them)
    model.pretrained_cfg = {
        **{k: v for k, v in model.pretrained_cfg.items() if k not in ("label_names", "label_descriptions")},
        **{k: config[k] for k in PRETRAINED_CFG_KEYS if k in config},
        "num_classes": model.num_classes,
    }
    model_args = dict(trained.meta.get("base", {}).get("model_args", {}))
    folder = Path(output)
    save_for_hf(model, str(folder), model_config={"label_names": names}, model_args=model_args, safe_serialization=True)
    return folder


def export_transformers(trained: Trained, output: str | Path) -> Path:
    """Merge ``trained`` into its plain transformers model and ``save_pretrained`` it (and the base's tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(output)
    merge_and_unload(trained.model).save_pretrained(folder)
    name = trained.meta.get("base", {}).get("model_name")
    if name:
        try:
            AutoTokenizer.from_pretrained(name).save_pretrained(folder)
        except (OSError, ValueError) as err:
            logger.info("no tokenizer saved: %s has none that AutoTokenizer loads (%s)", name, err)
    return folder


def export_adapter(
    adapter: str | Path,
    output: str | Path,
    *,
    pretrained_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Export ``adapter`` merged into its base model to the folder ``output`` (timm hub layout, or HF's)."""
    trained = open_adapter(adapter, pretrained_file=pretrained_file)
    try:
        if trained.library == "timm":
            folder = export_timm(trained, output, overrides)
        else:
            folder = export_transformers(trained, output)
    except Exception as err:  # a full disk or a refused write: one line naming the folder and the free space
        refused = disk_write_error(err, Path(output) / "model.safetensors", atomic=False)
        if refused is not None:
            raise refused from err
        raise
    logger.info("exported the merged %s model to %s", trained.library, folder)
    return folder


def build_parser() -> argparse.ArgumentParser:
    """The command's options (the data-config ones are ``train.py``'s and default to the run's)."""
    p = tool_parser(
        "neat-export",
        "Write the merged plain model of a trained adapter (timm hub layout, or save_pretrained).",
        DATA_CONFIG_OPTIONS,
    )
    p.add_argument("--output", required=True, help="folder to write")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """The command: export; a missing file or a bad option exits with one line."""

    def work(args: argparse.Namespace) -> Path:
        overrides = {k: getattr(args, k) for k in DATA_CONFIG_OPTIONS}
        return export_adapter(args.adapter, args.output, pretrained_file=args.pretrained_file, overrides=overrides)

    return run_tool(build_parser(), argv, work, (AdapterMismatchError, FileNotFoundError, DiskWriteError, ValueError))


cli = console_script(main)

if __name__ == "__main__":
    cli()
