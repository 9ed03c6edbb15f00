"""A module imported on first use, so what only registers (plugins, policies, the pipeline on a
fake backend) never pays for, or needs, torch.

    if TYPE_CHECKING:
        import torch
    else:
        torch = lazy_module("torch")

The first attribute read imports the real module (an ImportError then says which one is missing).
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads skip this hook
        return getattr(module, attr)


def lazy_module(name: str) -> Any:
    return _LazyModule(name)
