"""NEAT for Hugging Face transformers: RoBERTa/BERT and LLaMA-class models, GLUE and instruction-tuning runners.

Needs the ``nlp`` extra (``pip install "neat-vision[nlp]"``, in a checkout ``pip install -e ".[nlp]"``);
``import neat_vision`` works without it. Runners: ``neat-glue --config glue/<task>_neat_l`` and
``neat-instruct --config instruct/commonsense`` (``python -m neat_vision.nlp.glue`` / ``.instruct``; ``--config``
takes a path or a shipped config's name).
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
