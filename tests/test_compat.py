"""fused_dropout/_compat.py: the helpers behave the same on every supported torch, on both of
their branches (the one the running torch takes, and the other, forced)."""

from __future__ import annotations

import pytest
import torch

from fused_dropout import _compat


@pytest.mark.parametrize("takes_reason", [True, False], ids=["reason", "no-reason"])
def test_compiler_disable_runs_the_function_uncompiled(monkeypatch, takes_reason):
    if takes_reason and not _compat._disable_takes_reason():
        pytest.skip(f"torch {torch.__version__}'s torch.compiler.disable takes no reason=")
    monkeypatch.setattr(_compat, "_disable_takes_reason", lambda: takes_reason)
    seen = []

    def host_side(x):
        seen.append(torch.compiler.is_compiling())  # True only if dynamo traced it
        return x + 1

    wrapped = _compat.compiler_disable(host_side, "a reason")
    torch._dynamo.reset()
    out = torch.compile(lambda x: wrapped(x) * 2, backend="eager")(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 4.0))
    assert seen == [False]
