"""Bytes autograd saves for backward in one training forward of real models (CPU).

For each model: as built, after ``convert(model)`` and after ``convert(model, functional=True)``;
for BERT-base and ViT-S also with ``fuse_norm=True`` (their rows "fuse_norm": as built, after
``convert(model, fuse_norm=True)`` and after ``convert(model, functional=True, fuse_norm=True)``).
Counted are the distinct storages the saved-tensor hooks see, parameters excluded (they are
kept anyway), so the figure is what a training step holds for backward beyond the weights.
Models are built from their configs, without weights:

- Hugging Face BERT-base (``BertForSequenceClassification``) and GPT-2 (``GPT2LMHeadModel``),
  batch 2 x 128 tokens, eager attention and SDPA attention;
- timm ViT-S/16 (``vit_small_patch16_224``, drop/attn/proj/drop-path rates 0.1), batch 2 at
  224 px, with timm's fused attention (SDPA) and without it.

Run: ``python bench/saved_for_backward.py [part of the names]`` (about two minutes on 2 cores);
prints a markdown table.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# bench/kernels.py would shadow the ``kernels`` package transformers imports when it finds one.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import fused_dropout  # noqa: E402

BATCH, TOKENS, IMAGE = 2, 128, 224


def _activation_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages saved while ``forward`` runs, the parameters' left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def _hf(kind: str, attention: str):
    import transformers

    if kind == "bert":
        config = transformers.BertConfig(attn_implementation=attention)
        model = transformers.BertForSequenceClassification(config)
        ids = torch.randint(0, config.vocab_size, (BATCH, TOKENS))
        return model, lambda m: m(input_ids=ids, labels=torch.zeros(BATCH, dtype=torch.long)).loss
    config = transformers.GPT2Config(attn_implementation=attention)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (BATCH, TOKENS))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def _vit(fused_attn: bool):
    import timm
    import timm.layers

    timm.layers.set_fused_attn(fused_attn)
    rates = {"drop_rate": 0.1, "attn_drop_rate": 0.1, "proj_drop_rate": 0.1}
    model = timm.create_model("vit_small_patch16_224", drop_path_rate=0.1, **rates)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE)
    return model, lambda m: m(x).sum()


_BERT, _VIT = (
    f"BERT-base, {{}} attention ({BATCH}x{TOKENS})",
    f"timm ViT-S/16, {{}} ({BATCH}x224px)",
)
# name -> (builder, keywords of both conversions)
MODELS = {
    _BERT.format("eager"): (lambda: _hf("bert", "eager"), {}),
    _BERT.format("eager") + ", fuse_norm": (lambda: _hf("bert", "eager"), {"fuse_norm": True}),
    _BERT.format("SDPA"): (lambda: _hf("bert", "sdpa"), {}),
    _BERT.format("SDPA") + ", fuse_norm": (lambda: _hf("bert", "sdpa"), {"fuse_norm": True}),
    f"GPT-2, eager attention ({BATCH}x{TOKENS})": (lambda: _hf("gpt2", "eager"), {}),
    f"GPT-2, SDPA attention ({BATCH}x{TOKENS})": (lambda: _hf("gpt2", "sdpa"), {}),
    _VIT.format("eager attention"): (lambda: _vit(False), {}),
    _VIT.format("eager attention") + ", fuse_norm": (lambda: _vit(False), {"fuse_norm": True}),
    _VIT.format("fused (SDPA) attention"): (lambda: _vit(True), {}),
    _VIT.format("fused (SDPA) attention") + ", fuse_norm": (
        lambda: _vit(True),
        {"fuse_norm": True},
    ),
}


def measure(build, keywords: dict) -> tuple[int, int, int]:
    torch.manual_seed(0)
    model, step = build()
    model.train()
    figures = [_activation_bytes(model, lambda: step(model))]
    fused_dropout.convert(model, **keywords)
    figures.append(_activation_bytes(model, lambda: step(model)))
    fused_dropout.convert(model, functional=True, **keywords)
    figures.append(_activation_bytes(model, lambda: step(model)))
    fused_dropout.functional_mode.detach(model)
    return tuple(figures)


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else ""  # a part of the names to run
    warnings.simplefilter("ignore")
    mib = 2**20
    print("| model (batch) | as built | `convert` | `convert(functional=True)` |")
    print("|---|---:|---:|---:|")
    for name, (build, keywords) in MODELS.items():
        if only not in name:
            continue
        base, modules, functional = measure(build, keywords)
        print(
            f"| {name} | {base / mib:.1f} MiB | {modules / mib:.1f} MiB "
            f"(-{100 * (1 - modules / base):.0f}%) | {functional / mib:.1f} MiB "
            f"(-{100 * (1 - functional / base):.0f}%) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
