"""Helpers shared by the test files: bit-exact comparison, seeded inputs, and what the
instructions of a built library may be."""

from __future__ import annotations

import re
import subprocess

import torch

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

#: torch 2.6, pyproject's floor (README, "Tested torch versions"): the tests that fail there are
#: marked xfail(TORCH_2_6, strict=True), each with its reason, so a fix shows. Only 2.6 is
#: marked: 2.5 is below the floor, 2.7 to 2.13 were not tried.
TORCH_2_6 = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) == (2, 6)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` as integers (on the CPU, contiguous)."""
    t = t.detach().cpu().contiguous()
    return t.view(_INT_VIEW[t.element_size()])


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = "output"):
    """Same dtype, shape and bits; the message shows the first differing element."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {a.numel()} elements differ bitwise; first at {i}: "
            f"got {actual.detach()[i].item()!r} (0x{int(a[i]) & 0xFFFFFFFFFFFFFFFF:x}), "
            f"expected {expected[i].item()!r} (0x{int(e[i]) & 0xFFFFFFFFFFFFFFFF:x})"
        )


# A bf16 NaN result has this pattern on every device (README, "Differences from torch").
BF16_NAN = 0x7FC0
# bf16 NaNs of either sign, quiet and signalling, with and without payload
BF16_NAN_INPUTS = (0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7FA5)


def bf16_with_nans(shape, seed=0) -> torch.Tensor:
    """A bf16 tensor (contiguous) of standard normal values, every 5th element a NaN of one
    of BF16_NAN_INPUTS in turn, every 7th +inf and -inf in turn (-inf first for an odd
    ``seed``: two operands of seeds of both parities add up to inf - inf)."""
    t = randn(shape, torch.bfloat16, seed).view(-1).view(torch.int16)
    nans = torch.tensor(BF16_NAN_INPUTS, dtype=torch.int32).to(torch.int16)
    where = torch.arange(0, t.numel(), 5)
    t[where] = nans.repeat(len(where) // len(nans) + 1)[: len(where)]
    where = torch.arange(0, t.numel(), 7)
    signs = torch.tensor([0x7F80, 0xFF80], dtype=torch.int32).to(torch.int16)
    t[where] = signs.roll(seed % 2).repeat(len(where) // 2 + 1)[: len(where)]
    return t.view(torch.bfloat16).view(shape)


def assert_bf16_nans(actual: torch.Tensor, expected: torch.Tensor, what: str = "output"):
    """``actual`` is NaN where ``expected`` is (at least once), and every NaN is BF16_NAN."""
    nan = actual.detach().cpu().isnan()
    assert torch.equal(nan, expected.isnan()), f"{what}: NaNs at other places"
    assert bool(nan.any()), f"{what}: no NaN result to check"
    patterns = sorted({v & 0xFFFF for v in bits(actual)[nan].tolist()})
    assert patterns == [BF16_NAN], f"{what}: bf16 NaN patterns {[hex(v) for v in patterns]}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed=0) -> torch.Tensor:
    """Standard normal ``shape`` in ``dtype``, drawn from its own generator."""
    base = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(shape, generator=gen(seed), dtype=base).to(dtype)


def run_steps(model, x, gy, seed, steps=2):
    """``steps`` forward/backward passes from ``torch.manual_seed(seed)``: per step the
    output, the input's gradient and the parameters' gradients (torch.compile's
    ``_orig_mod.`` prefix removed), to compare an eager model with its compiled copy."""
    torch.manual_seed(seed)
    outs = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        xx = x.detach().clone().requires_grad_()
        y = model(xx)
        y.backward(gy)
        grads = {
            n.removeprefix("_orig_mod."): prm.grad.clone() for n, prm in model.named_parameters()
        }
        outs.append((y.detach(), xx.grad, grads))
    return outs


def random64_draw(gen: torch.Generator | None) -> int:
    """One random64() draw of a CPU generator, as int64 (the contract's CPU seed)."""
    t = torch.empty((), dtype=torch.int64)
    t.random_(-(2**63), None, generator=gen)  # full 64-bit range == random64()
    return int(t)


def _functions(library: str) -> dict[str, list[str]]:
    """Instruction lines of each function of the library, from objdump -d."""
    out = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = functions.setdefault(m.group(1), [])
        elif "\t" in line:
            current.append(line.split("\t", 1)[1])
    return functions


def assert_avx_only_in_capability_code(library: str) -> None:
    """The linked library, as the linker made it: no instruction of AVX or later (VEX/EVEX:
    v-mnemonics) outside the functions of the avx2 and avx512(bf16) kernel objects, and no
    AVX-512 register in the avx2 ones, so generic code runs on any x86-64 CPU (objdump)."""
    functions = _functions(library)
    caps = ("avx512bf16", "avx512", "avx2", "default")
    seen = dict.fromkeys(caps, 0)
    for name, lines in functions.items():
        cap = next((c for c in caps if f"cpu_{c}::" in name), None)
        if cap is not None:
            seen[cap] += 1
        mnemonics = [ln.split()[0] for ln in lines if ln.split()]
        vex = [m for m in mnemonics if m.startswith("v") and m not in ("verr", "verw")]
        if cap in (None, "default"):
            assert vex == [], (name, vex[:5])
        elif cap == "avx2":
            assert not any(re.search(r"%zmm|%k[0-7]", ln) for ln in lines), name
    assert all(seen.values()), seen  # the symbols are there (an unstripped library)
    for cap in ("avx512", "avx512bf16"):
        code = [ln for n, lines in functions.items() if f"cpu_{cap}::" in n for ln in lines]
        assert any("%zmm" in ln for ln in code), cap
    bf16 = [ln for n, lines in functions.items() if "cpu_avx512bf16::" in n for ln in lines]
    assert any("vcvtneps2bf16" in ln for ln in bf16)  # what that path is for
