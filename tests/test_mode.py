"""fused_dropout.mode() and convert(model, functional=True): torch's functional dropout calls
run our kernels.

- Each routed spelling gives the output of ``fused_dropout.functional`` called with the same
  ``(seed, offset)`` pair, and autograd saves no mask (only the 16-byte pair).
- Everything we do not take runs torch's own code: same results, errors and warnings.
- convert(functional=True): nested and reentrant calls, exceptions, detach, activation
  checkpointing (reentrant or not), torch.compile (``torch.compile(model)`` and
  ``model.compile()``, fullgraph), and a Hugging Face BERT in eager attention.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fused_dropout
from fused_dropout import functional as FD
from fused_dropout import functional_mode, ops


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


def saved_tensors(fn):
    """``fn()`` and the (dtype, shape) of every tensor autograd saved while it ran."""
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def next_pair() -> tuple[int, int]:
    """The pair our next CPU call will draw from the default generator (without drawing it)."""
    state = torch.get_rng_state()
    pair = ops.dropout(torch.ones(1), 0.5)[1].tolist()
    torch.set_rng_state(state)
    return pair[0] % 2**64, pair[1]


# (routed callable, our functional, shape, kwargs for ours); torch.* spellings are positional.
X4 = (4, 6, 5, 3)
CASES = {
    "F.dropout": (lambda x: F.dropout(x, 0.3), FD.dropout, X4, {}),
    "F.dropout(p=1)": (lambda x: F.dropout(x, 1.0), FD.dropout, X4, {"p": 1.0}),
    "F.dropout1d": (lambda x: F.dropout1d(x, 0.3), FD.dropout1d, (4, 6, 5), {}),
    "F.dropout1d(unbatched)": (lambda x: F.dropout1d(x, 0.3), FD.dropout1d, (6, 5), {}),
    "F.dropout2d": (lambda x: F.dropout2d(x, 0.3), FD.dropout2d, X4, {}),
    "F.dropout3d": (lambda x: F.dropout3d(x, 0.3), FD.dropout3d, (2, 3, 4, 5, 2), {}),
    "F.dropout3d(unbatched)": (lambda x: F.dropout3d(x, 0.3), FD.dropout3d, (3, 4, 5, 2), {}),
    "F.alpha_dropout": (
        lambda x: F.alpha_dropout(x, 0.3, training=True),
        FD.alpha_dropout,
        X4,
        {"training": True},
    ),
    "F.feature_alpha_dropout": (
        lambda x: F.feature_alpha_dropout(x, 0.3, True),
        FD.feature_alpha_dropout,
        X4,
        {"training": True},
    ),
    "torch.dropout": (lambda x: torch.dropout(x, 0.3, True), FD.dropout, X4, {}),
    "torch.dropout(kwargs)": (
        lambda x: torch.dropout(input=x, p=0.3, train=True),
        FD.dropout,
        X4,
        {},
    ),
    "torch.feature_dropout": (lambda x: torch.feature_dropout(x, 0.3, True), FD.dropout2d, X4, {}),
    "torch.alpha_dropout": (
        lambda x: torch.alpha_dropout(x, 0.3, True),
        FD.alpha_dropout,
        X4,
        {"training": True},
    ),
    "torch.feature_alpha_dropout": (
        lambda x: torch.feature_alpha_dropout(x, 0.3, True),
        FD.feature_alpha_dropout,
        X4,
        {"training": True},
    ),
    "aten.dropout": (lambda x: torch.ops.aten.dropout(x, 0.3, True), FD.dropout, X4, {}),
    "aten.dropout.default": (
        lambda x: torch.ops.aten.dropout.default(x, 0.3, True),
        FD.dropout,
        X4,
        {},
    ),
    "nn.Dropout": (lambda x: nn.Dropout(0.3)(x), FD.dropout, X4, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_routed_call_matches_ours_with_the_same_pair_and_saves_no_mask(case):
    routed, ours, shape, kw = CASES[case]
    kw = {"p": 0.3, **kw}
    x = torch.randn(shape, requires_grad=True)
    pair = next_pair()
    with fused_dropout.mode():
        y, saved = saved_tensors(lambda: routed(x))
    expected = ours(x.detach(), seed_offset=pair, **kw)
    assert torch.equal(y, expected)
    assert saved == [(torch.int64, (2,))]  # the pair, no mask
    g = torch.randn(shape)
    (gx,) = torch.autograd.grad(y, x, g)
    # The gradient of y = x * mask * scale is g * mask * scale: ours applied to g, same pair.
    if "alpha" not in case:
        assert torch.equal(gx, ours(g, seed_offset=pair, **kw))


@pytest.mark.parametrize("inplace_fn", ["dropout_", "feature_dropout_", "alpha_dropout_"])
def test_inplace_torch_spellings_are_routed_in_place(inplace_fn):
    x = torch.randn(X4)
    pair = next_pair()
    ours = {"dropout_": FD.dropout, "feature_dropout_": FD.dropout2d}.get(inplace_fn)
    expected = (ours or FD.alpha_dropout)(x, 0.3, True, seed_offset=pair)
    with fused_dropout.mode():
        y = getattr(torch, inplace_fn)(x, 0.3, True)
    assert y is x
    assert torch.equal(x, expected)


def test_inplace_functional_is_routed_in_place():
    x = torch.randn(X4)
    pair = next_pair()
    expected = FD.dropout(x, 0.3, seed_offset=pair)
    with fused_dropout.mode():
        y = F.dropout(x, 0.3, inplace=True)
    assert y is x and torch.equal(x, expected)


def _torch_and_routed(fn, x):
    """``fn(x)`` by torch, then under the mode, from one seed: (result or exception, warnings)."""
    outcomes = []
    for routed in (False, True):
        torch.manual_seed(5)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            try:
                if routed:
                    with fused_dropout.mode():
                        out = fn(x)
                else:
                    out = fn(x)
            except Exception as e:  # compared with torch's own below
                out = (type(e), str(e))
        outcomes.append((out, [(str(w.message), w.category) for w in rec]))
    return outcomes


PASSED_THROUGH = {
    "eval": (lambda x: F.dropout(x, 0.3, training=False), torch.randn(X4)),
    "p=0": (lambda x: F.dropout(x, 0.0), torch.randn(X4)),
    "int input": (lambda x: F.dropout(x, 0.3), torch.ones(X4, dtype=torch.int32)),
    "complex input": (lambda x: F.dropout(x, 0.3), torch.randn(X4, dtype=torch.complex64)),
    "bad p": (lambda x: F.dropout(x, 1.5), torch.randn(X4)),
    "NaN p": (lambda x: torch.dropout(x, float("nan"), True), torch.randn(X4)),
    "dropout2d on 3-D (warns)": (lambda x: F.dropout2d(x, 0.3), torch.randn(4, 6, 5)),
    "dropout2d on 5-D (warns)": (lambda x: F.dropout2d(x, 0.3), torch.randn(2, 3, 4, 5, 2)),
    "dropout1d on 4-D (raises)": (lambda x: F.dropout1d(x, 0.3), torch.randn(X4)),
    "feature_dropout on 1-D": (lambda x: torch.feature_dropout(x, 0.3, True), torch.randn(7)),
    "native_dropout": (lambda x: torch.native_dropout(x, 0.3, True), torch.randn(X4)),
    "train as int": (lambda x: torch.dropout(x, 0.3, 1), torch.randn(X4)),
    "too many args": (lambda x: torch.dropout(x, 0.3, True, True), torch.randn(X4)),
}


@pytest.mark.parametrize("case", PASSED_THROUGH)
def test_what_we_do_not_take_runs_torch(case):
    fn, x = PASSED_THROUGH[case]
    (t_out, t_warn), (r_out, r_warn) = _torch_and_routed(fn, x)
    # Same warnings; like under any TorchFunctionMode, torch's stacklevel then points at the
    # mode's __torch_function__ rather than at the caller.
    assert r_warn == t_warn
    if isinstance(t_out, tuple) and isinstance(t_out[0], type):
        assert r_out == t_out  # the same exception type and message
    else:
        for a, b in zip(
            torch.utils._pytree.tree_leaves(t_out), torch.utils._pytree.tree_leaves(r_out)
        ):
            assert torch.equal(a, b)  # torch's own masks: the same draw from the same seed


def test_meta_and_subclass_inputs_pass_through():
    meta = torch.empty(X4, device="meta")
    with fused_dropout.mode():
        assert F.dropout(meta, 0.3).device.type == "meta"

    class Tagged(torch.Tensor):
        pass

    t = torch.randn(X4).as_subclass(Tagged)
    torch.manual_seed(3)
    expected = F.dropout(t, 0.3)
    torch.manual_seed(3)
    with fused_dropout.mode():
        got = F.dropout(t, 0.3)
    assert type(got) is Tagged and torch.equal(got, expected)


# ------------------------------------------------------------------ convert(functional=True)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.3, self.training)


class Net(nn.Module):
    def __init__(self, ckpt=None) -> None:
        super().__init__()
        self.block = Block()
        self.drop = nn.Dropout(0.2)
        self.ckpt = ckpt  # None, or use_reentrant for torch.utils.checkpoint

    def forward(self, x):
        y = (
            self.block(x)
            if self.ckpt is None
            else checkpoint(self.block, x, use_reentrant=self.ckpt)
        )
        return self.drop(y)


@pytest.fixture
def attached():
    """Models attached in a test are detached after it (no global hooks left behind)."""
    models = []
    yield models
    for m in models:
        functional_mode.detach(m)


def _functional(model, attached):
    model, counts = fused_dropout.convert(model, functional=True)
    attached.append(model)
    return model, counts


def _calls_of_torch_dropout(fn):
    """How many times torch's own dropout kernels ran during ``fn()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if "bernoulli" in name or "native_dropout" in name:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_convert_functional_routes_forward_only_and_detaches(attached):
    model, counts = _functional(Net(), attached)
    assert counts == {"Dropout": 1}
    assert functional_mode.is_attached(model)
    x = torch.randn(3, 5, requires_grad=True)
    y, saved = saved_tensors(lambda: model(x))
    assert (torch.int64, (2,)) in saved and not functional_mode.active()
    assert sum(s == (torch.int64, (2,)) for s in saved) == 2  # both dropouts: ours
    assert _calls_of_torch_dropout(lambda: model(x)) == 0
    assert _calls_of_torch_dropout(lambda: F.dropout(x, 0.3)) > 0  # outside the model: torch
    functional_mode.detach(model)
    assert not functional_mode.is_attached(model)
    assert _calls_of_torch_dropout(lambda: model.block(x)) > 0
    assert not functional_mode._hooks  # nothing attached: the global hooks are gone


def test_nested_reentrant_and_raising_calls_leave_the_stack_clean(attached):
    inner, _ = _functional(Block(), attached)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.depth = 0

        def forward(self, x):
            self.depth += 1
            if self.depth < 3:
                x = self(x)  # reentrant
            if self.depth == 5:
                raise RuntimeError("boom")
            return self.inner(x)

    outer, _ = _functional(Outer(), attached)
    x = torch.randn(3, 5)
    assert _calls_of_torch_dropout(lambda: outer(x)) == 0
    assert not functional_mode.active() and functional_mode._frames() == []
    outer.depth = 4
    with pytest.raises(RuntimeError, match="boom"):
        outer(x)
    assert not functional_mode.active() and functional_mode._frames() == []
    with fused_dropout.mode():  # already active: the model's call pushes no second mode
        outer.depth = 2
        outer(x)
        assert len(torch.overrides._get_current_function_mode_stack()) == 1


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_under_the_mode(reentrant, attached):
    plain, _ = _functional(Net(), attached)
    ckpt, _ = _functional(Net(reentrant), attached)
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, ckpt):
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(11)
        y = model(x)
        y.pow(2).sum().backward()
        results.append((y, x.grad, model.block.lin.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_activation_checkpointing_of_converted_modules():
    block = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.3))
    fused_dropout.convert(block)
    x = torch.randn(3, 5, requires_grad=True)
    torch.manual_seed(2)
    y = checkpoint(block, x, use_reentrant=False)
    y.sum().backward()
    torch.manual_seed(2)
    x2 = x.detach().clone().requires_grad_()
    block(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_torch_compile_keeps_the_routing(how, attached):
    import torch._dynamo.testing

    eager, _ = _functional(Net(), attached)
    compiled, _ = _functional(copy.deepcopy(eager), attached)
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    if how == "model.compile()":
        compiled.compile(backend=backend, fullgraph=True)
    else:
        compiled = torch.compile(compiled, backend=backend, fullgraph=True)
    x = torch.randn(3, 5)
    torch.manual_seed(4)
    expected = eager(x)
    torch.manual_seed(4)
    got = compiled(x)
    assert torch.equal(got, expected)
    assert backend.frame_count == 1
    targets = [n.target for g in backend.graphs for n in g.graph.nodes]
    assert targets.count(torch.ops.fused_dropout.dropout) == 2
    assert F.dropout not in targets
    torch._dynamo.reset()


def test_scripting_a_functional_model_still_works(attached):
    model, _ = _functional(nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.3)), attached)
    scripted = torch.jit.script(model)  # the global hooks are not the model's: nothing to compile
    x = torch.randn(3, 5)
    torch.manual_seed(6)
    a = model(x)
    torch.manual_seed(6)
    assert torch.equal(scripted(x), a)


# ------------------------------------------------------------------ Hugging Face BERT


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def test_huggingface_bert_eager_attention(attached):
    model = _tiny_bert()
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    converted, counts = _functional(copy.deepcopy(model), attached)
    assert counts["Dropout"] >= 1
    converted.eval()
    with torch.no_grad():
        after = converted(input_ids=ids).logits
    assert torch.equal(before, after)  # eval: bitwise unchanged

    converted.train()
    out, saved = saved_tensors(lambda: converted(input_ids=ids, labels=labels))
    assert _calls_of_torch_dropout(lambda: converted(input_ids=ids, labels=labels)) == 0
    assert not any(dtype in (torch.bool, torch.uint8) for dtype, _ in saved)
    pairs = sum(s == (torch.int64, (2,)) for s in saved)
    # embeddings, per layer: attention probabilities (functional), attention output, FFN output
    assert pairs == 1 + 3 * model.config.num_hidden_layers + 1  # + the classifier's dropout

    opt = torch.optim.Adam(converted.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = converted(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])


def test_checkpointed_plain_function_with_context_fn():
    """A checkpointed *function* (not a module) recomputes under the mode via ``context_fn``."""
    lin = nn.Linear(5, 5)

    def fn(x):
        return F.dropout(lin(x), 0.3)

    grads = []
    for use_checkpoint in (False, True):
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(8)
        with fused_dropout.mode():
            if use_checkpoint:
                y = checkpoint(
                    fn,
                    x,
                    use_reentrant=False,
                    context_fn=lambda: (fused_dropout.mode(), fused_dropout.mode()),
                )
            else:
                y = fn(x)
        y.sum().backward()
        grads.append((y, x.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_huggingface_bert_gradient_checkpointing(attached):
    model = _tiny_bert()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    plain, _ = _functional(copy.deepcopy(model), attached)
    ckpt, _ = _functional(copy.deepcopy(model), attached)
    ckpt.gradient_checkpointing_enable()
    grads = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(3)
        m(input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
