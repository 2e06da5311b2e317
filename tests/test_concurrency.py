"""Threads and processes: 8 Python threads calling every op at once (default and private
generators), masks independent of torch.set_num_threads, and the ops in forked and spawned
children (DataLoader workers, multiprocessing)."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import sys
import threading
import warnings

import pytest
import torch

import fused_dropout
from fused_dropout import functional as FD
from fused_dropout import ops

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
ref = importlib.import_module("reference")  # tests/reference.py, whatever the import mode
from helpers import assert_bitwise, random64_draw  # noqa: E402

THREADS = 8
ROUNDS = 12


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def x_of(shape=(6, 5, 7), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# Every registered op, with the reference of its output for a pair: (name, call(generator) ->
# (output, pair), reference(pair) -> expected output).
X, R, B = x_of(), x_of(seed=1), x_of((7,), seed=2)
PAIR_OPS = {
    "dropout": (
        lambda g: ops.dropout(X, 0.4, generator=g),
        lambda s, o: ref.ref_dropout(X, 0.4, s, o),
    ),
    "dropout_channels": (
        lambda g: ops.dropout(X, 0.4, 2, generator=g),
        lambda s, o: ref.ref_dropout(X, 0.4, s, o, 2),
    ),
    "alpha_dropout_samples": (
        lambda g: ops.dropout(X, 0.4, 1, alpha=True, generator=g),
        lambda s, o: ref.ref_dropout(X, 0.4, s, o, 1, alpha=True),
    ),
    "dropout_": (
        lambda g: (lambda y: (y, ops.dropout_(y, 0.4, generator=g)))(X.clone()),
        lambda s, o: ref.ref_dropout(X, 0.4, s, o),
    ),
    "dropout_add": (
        lambda g: ops.dropout_add(X, R, None, 0.4, generator=g),
        lambda s, o: ref.ref_dropout_add(X, R, None, 0.4, s, o),
    ),
    "bias_dropout_add_samples": (
        lambda g: ops.dropout_add(X, R, B, 0.4, 1, generator=g),
        lambda s, o: ref.ref_dropout_add(X, R, B, 0.4, s, o, 1),
    ),
}
# Every public functional op and module, on the default generator: they do not return their
# pair, so the draw each call took is found from its output (a mask of 64 elements or more
# tells the draws apart), by replaying the generator's draws.
XF, RF, BF = x_of((64, 2, 3), seed=3), x_of((64, 2, 3), seed=4), x_of((3,), seed=5)
FUNCTIONAL = {
    "dropout": lambda: FD.dropout(XF, 0.4),
    "alpha_dropout": lambda: FD.alpha_dropout(XF, 0.4, True),
    "dropout1d": lambda: FD.dropout1d(XF, 0.4),
    "dropout2d": lambda: FD.dropout2d(XF[..., None], 0.4),
    "dropout3d": lambda: FD.dropout3d(XF[..., None, None], 0.4),
    "feature_alpha_dropout": lambda: FD.feature_alpha_dropout(XF, 0.4, True),
    "drop_path": lambda: FD.drop_path(XF, 0.4, True),
    "stochastic_depth": lambda: FD.stochastic_depth(XF, 0.4, "row"),
    "drop_path_add": lambda: FD.drop_path_add(RF, XF, 0.4),
    "dropout_add": lambda: FD.dropout_add(XF, RF, 0.4),
    "bias_dropout_add": lambda: FD.bias_dropout_add(XF, BF, RF, 0.4),
    "Dropout": lambda: fused_dropout.Dropout(0.4)(XF),
    "DropPath": lambda: fused_dropout.DropPath(0.4)(XF),
    "BiasDropoutAdd": lambda: fused_dropout.BiasDropoutAdd(0.4)(XF, BF, RF),
}


def run_threads(work) -> list:
    """``work(i)`` on THREADS threads released together; their results, or the first error."""
    barrier = threading.Barrier(THREADS)
    results: list = [None] * THREADS
    errors: list = []

    def target(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    if errors:
        raise errors[0]
    return results


def calls_of_every_op(generator, functional=True):
    """ROUNDS rounds of every op: the (name, output, pair) of those that return their pair,
    then with ``functional`` the (name, output) of the FUNCTIONAL calls."""
    out, outputs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(ROUNDS):
            for name, (call, _) in PAIR_OPS.items():
                y, pair = call(generator)
                out.append((name, y, tuple(pair.tolist())))
            if functional:
                outputs += [(name, call()) for name, call in FUNCTIONAL.items()]
    return (out, outputs) if functional else out


def draws_of(outputs, states: dict[int, torch.Tensor]) -> list[int]:
    """For each (name, output) of a FUNCTIONAL call, the draw k that gives that output when
    the default generator is in ``states[k]`` (the state before the generator's k-th draw),
    or -1 if none does. A mask tells its draws apart: no two give the same output."""
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in FUNCTIONAL.items():
            for k, state in states.items():
                torch.default_generator.set_state(state)
                key = (name, call().numpy().tobytes())
                assert key not in found, f"{name}: draws {found[key]} and {k} give one output"
                found[key] = k
    return [found.get((name, y.numpy().tobytes()), -1) for name, y in outputs]


def test_threads_on_the_default_generator_never_share_a_pair():
    """8 threads call every op at once on the default generator: each call takes one random64
    draw of it, the draws are its first ones, each taken once (none repeated, none lost,
    the FUNCTIONAL calls' included), and the generator ends after that many draws."""
    torch.manual_seed(123)
    start = torch.default_generator.get_state()
    results = run_threads(lambda i: calls_of_every_op(None))
    end = torch.default_generator.get_state()
    calls = [c for r, _ in results for c in r]
    outputs = [o for _, r in results for o in r]
    replay = torch.Generator()
    replay.set_state(start)
    states, seeds = {}, []
    for k in range(len(calls) + len(outputs)):
        states[k] = replay.get_state()
        seeds.append(random64_draw(replay))
    assert torch.equal(end, replay.get_state()), "the generator ended elsewhere"
    assert len(set(seeds)) == len(seeds)
    pairs = [pair for _, _, pair in calls]
    assert all(o == 0 for _, o in pairs)
    taken = [seeds.index(s) if s in seeds else -1 for s, _ in pairs]
    rest = {k: s for k, s in states.items() if k not in taken}
    taken += draws_of(outputs, rest)
    assert -1 not in taken, f"{taken.count(-1)} calls used no draw of the generator"
    assert sorted(taken) == list(range(len(seeds))), "draws repeated or lost"
    for name, y, (s, o) in calls[:: max(1, len(calls) // 60)]:  # outputs are those of the pair
        assert_bitwise(y, PAIR_OPS[name][1](s, o), name)


def test_threads_on_private_generators_reproduce_their_sequences():
    def work(i):
        return calls_of_every_op(torch.Generator().manual_seed(1000 + i), functional=False)

    results = run_threads(work)
    for i, calls in enumerate(results):
        alone = calls_of_every_op(torch.Generator().manual_seed(1000 + i), functional=False)
        assert [c[2] for c in calls] == [c[2] for c in alone], f"thread {i}"
        for (name, y, _), (_, y_alone, _) in zip(calls, alone):
            assert_bitwise(y, y_alone, f"thread {i}: {name}")
    pairs = [c[2] for calls in results for c in calls]
    assert len(set(pairs)) == len(pairs)


THREAD_COUNT_CASES = {  # every op kind, on tensors large enough to be split between threads
    "dropout": lambda x, r, b: FD.dropout(x, 0.3, seed_offset=(7, 8)),
    "alpha_dropout": lambda x, r, b: FD.alpha_dropout(x, 0.3, True, seed_offset=(7, 8)),
    "dropout1d": lambda x, r, b: FD.dropout1d(x.flatten(2), 0.3, seed_offset=(7, 8)),
    "dropout2d": lambda x, r, b: FD.dropout2d(x, 0.3, seed_offset=(7, 8)),
    "dropout2d_channels_last": lambda x, r, b: FD.dropout2d(
        x.contiguous(memory_format=torch.channels_last), 0.3, seed_offset=(7, 8)
    ),
    "dropout3d": lambda x, r, b: FD.dropout3d(x.unsqueeze(2), 0.3, seed_offset=(7, 8)),
    "feature_alpha_dropout": lambda x, r, b: FD.feature_alpha_dropout(
        x, 0.3, True, seed_offset=(7, 8)
    ),
    "drop_path": lambda x, r, b: FD.drop_path(x, 0.3, True, seed_offset=(7, 8)),
    "stochastic_depth": lambda x, r, b: FD.stochastic_depth(x, 0.3, "row", seed_offset=(7, 8)),
    "dropout_add": lambda x, r, b: FD.dropout_add(x, r, 0.3, seed_offset=(7, 8)),
    "bias_dropout_add": lambda x, r, b: FD.bias_dropout_add(x, b, r, 0.3, seed_offset=(7, 8)),
    "drop_path_add": lambda x, r, b: FD.drop_path_add(r, x, 0.3, seed_offset=(7, 8)),
    "inplace": lambda x, r, b: FD.dropout(x.clone(), 0.3, inplace=True, seed_offset=(7, 8)),
    "strided": lambda x, r, b: FD.dropout(x[:, ::2].transpose(1, 3), 0.3, seed_offset=(7, 8)),
    "backward": lambda x, r, b: ops.dropout_backward(x, torch.tensor([7, 8]), 0.3, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_op_gives_the_same_result_for_every_thread_count(dtype):
    x, r = x_of((8, 16, 48, 48), dtype, 3), x_of((8, 16, 48, 48), dtype, 4)  # 295k elements
    b = x_of((48,), dtype, 5)
    old = torch.get_num_threads()
    counts = sorted({1, 2, 3, max(4, os.cpu_count() or 1)})
    results = {}
    try:
        for n in counts:
            torch.set_num_threads(n)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[n] = {name: f(x, r, b) for name, f in THREAD_COUNT_CASES.items()}
    finally:
        torch.set_num_threads(old)
    for n in counts[1:]:
        for name in THREAD_COUNT_CASES:
            assert_bitwise(results[n][name], results[1][name], f"{name} with {n} threads")
    assert_bitwise(results[1]["dropout"], ref.ref_dropout(x, 0.3, 7, 8))


# ------------------------------------------------------------------------------------- processes
def child_work(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """What a child process computes: with an explicit pair, and with a generator's draw."""
    x = x_of((33, 17))
    y, pair = ops.dropout(x, 0.5, generator=torch.Generator().manual_seed(seed))
    return FD.dropout(x, 0.5, seed_offset=(seed, 4)), y, pair.tolist()


def check_child_result(seed, result):
    explicit, drawn, pair = result
    x = x_of((33, 17))
    assert_bitwise(explicit, ref.ref_dropout(x, 0.5, seed, 4), f"child {seed}")
    assert pair == [random64_draw(torch.Generator().manual_seed(seed)), 0]
    assert_bitwise(drawn, ref.ref_dropout(x, 0.5, pair[0], 0), f"child {seed} (generator)")


class _Dataset(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        a, _, _ = child_work(i)
        # The default generator of a worker is seeded per worker and item by the DataLoader.
        return a, FD.dropout(x_of((33, 17)), 0.5), torch.utils.data.get_worker_info().id


@pytest.mark.parametrize("start", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_ops_work_in_multiprocessing_children(start):  # spawn: each child imports torch anew
    torch.ops.fused_dropout.dropout  # noqa: B018  (the library is loaded before the fork)
    FD.dropout(x_of(), 0.5)  # and used: its thread pool exists
    ctx = mp.get_context(start)
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(child_work, (s,)) for s in (1, 2, 3)]
        for s, r in zip((1, 2, 3), results):
            check_child_result(s, r.get(timeout=300))


def test_ops_work_in_dataloader_workers():
    FD.dropout(x_of(), 0.5)  # used in the parent before the workers fork
    loader = torch.utils.data.DataLoader(
        _Dataset(), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=300
    )
    seen = []
    for i, (a, drawn, worker) in enumerate(loader):
        assert_bitwise(a, ref.ref_dropout(x_of((33, 17)), 0.5, i, 4), f"item {i}")
        assert ((drawn == 0) | (drawn == 2 * x_of((33, 17)))).all()
        seen.append((worker, drawn))
    assert {w for w, _ in seen} == {0, 1}
    masks = [d != 0 for _, d in seen]
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks), "workers repeat masks"
