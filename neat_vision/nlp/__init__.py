"""NEAT for Hugging Face transformers: RoBERTa/BERT and LLaMA-class models, GLUE and instruction-tuning runners.

Needs the ``nlp`` extra (``pip install -e ".[nlp]"``); ``import neat_vision`` works without it. Runners:
``python -m neat_vision.nlp.glue --config configs/glue/<task>_neat_l.yaml`` and
``python -m neat_vision.nlp.instruct --config configs/instruct/commonsense.yaml``.
"""

try:
    import transformers  # noqa: F401
except ImportError as err:
    raise ImportError('neat_vision.nlp needs transformers: pip install -e ".[nlp]"') from err

from ..integrations import register_transformers
from ..integrations.transformers import apply_adapter, apply_neat, describe_transformers, from_pretrained, load_adapter
from ..integrations.transformers_presets import MODEL_TYPES, PRESETS, preset_aliases

register_transformers()

__all__ = [
    "MODEL_TYPES",
    "PRESETS",
    "apply_adapter",
    "apply_neat",
    "describe_transformers",
    "from_pretrained",
    "load_adapter",
    "preset_aliases",
]
