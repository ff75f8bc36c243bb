"""Module paths of earlier releases, kept importable (and runnable with ``python -m``) with a DeprecationWarning."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

# old module -> where its contents live now
MOVED = {
    "neat_vision.config": "neat_vision.methods",
    "neat_vision.tweaker": "neat_vision.methods.neat",
    "neat_vision.baselines": "neat_vision.methods",
    "neat_vision.timm_hook": "neat_vision.integrations.timm",
    "neat_vision.pretrained": "neat_vision.integrations.timm_weights",
    "neat_vision.models": "neat_vision.integrations.timm_fractal",
    "neat_vision.peft_convert": "neat_vision.integrations.peft",
    "neat_vision.nlp.apply": "neat_vision.integrations.transformers",
    "neat_vision.nlp.presets": "neat_vision.integrations.transformers_presets",
    "neat_vision.study": "neat_vision.studies.study",
    "neat_vision.cluster": "neat_vision.studies.slurm",
    "neat_vision.compare": "neat_vision.studies.compare",
    "neat_vision.trained": "neat_vision.tools.trained",
    "neat_vision.predict": "neat_vision.tools.predict",
    "neat_vision.evaluate": "neat_vision.tools.evaluate",
    "neat_vision.export": "neat_vision.tools.export",
}


def _warn(old: str) -> None:
    warnings.warn(
        f"{old} is deprecated: its contents live in {MOVED[old]} (this alias goes in a later release)",
        DeprecationWarning,
        stacklevel=3,
    )


class _MovedLoader(importlib.abc.Loader):
    """Gives the new module under the old name; for ``python -m old`` it hands over the new module's code."""

    def create_module(self, spec: Any) -> ModuleType:
        _warn(spec.name)
        module = importlib.import_module(MOVED[spec.name])
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set the alias's spec on the module: put its own back

    def get_code(self, fullname: str) -> Any:
        _warn(fullname)
        new = importlib.util.find_spec(MOVED[fullname])
        return new.loader.get_code(MOVED[fullname])


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        origin = importlib.util.find_spec(MOVED[fullname]).origin  # python -m sets sys.argv[0] to it
        return importlib.util.spec_from_loader(fullname, _MovedLoader(), origin=origin)


def install_moved_modules() -> None:
    """Let the old module paths import (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
