"""Where torch's Python API differs between the versions we support, the one place that hides it.

pyproject.toml claims the torch versions that were tested (README, "Tested torch versions").
The rest of the package calls the helpers here and never checks ``torch.__version__`` itself.
Each helper tests for the feature (a parameter, an attribute), not for a version number, so a
backport or a nightly behaves by what it has.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


@functools.cache
def _disable_takes_reason() -> bool:
    # Reads the signature only: calling torch.compiler.disable imports torch._dynamo (seconds).
    return "reason" in inspect.signature(torch.compiler.disable).parameters


def compiler_disable(fn: F, reason: str) -> F:
    """``torch.compiler.disable(fn, reason=reason)``: a graph break whose report names
    ``reason``. torch 2.6 takes no ``reason`` (its graph-break report then says only that the
    function is disabled); the function is disabled all the same."""
    if _disable_takes_reason():
        return torch.compiler.disable(fn, reason=reason)
    return torch.compiler.disable(fn)
