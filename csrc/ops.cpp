// Every schema of the library, in one place. The implementations register themselves:
// ops/kernels.cpp for the CPU and CUDA keys, ops/autograd.cpp for Autograd, ops/rng.cpp for
// draw_seed_offset (no tensor to dispatch on: one kernel for every device), and
// fused_dropout/ops.py holds the fake (meta) kernels.
#include <torch/library.h>

TORCH_LIBRARY(fused_dropout, m) {
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def(
      "dropout(Tensor input, float p, int mask_ndim, bool scale_by_keep, bool alpha, int? seed, "
      "int? offset, Generator? generator) -> (Tensor, Tensor)",
      seeded);
  m.def(
      "dropout_(Tensor(a!) input, float p, int mask_ndim, bool scale_by_keep, bool alpha, "
      "int? seed, int? offset, Generator? generator) -> Tensor",
      seeded);
  m.def(
      "dropout_backward(Tensor grad, Tensor seed_offset, float p, int mask_ndim, "
      "bool scale_by_keep, bool alpha) -> Tensor");
  m.def(
      "dropout_add(Tensor input, Tensor residual, Tensor? bias, float p, int mask_ndim, "
      "bool scale_by_keep, int? seed, int? offset, Generator? generator) -> (Tensor, Tensor)",
      seeded);
  // The pair the next op call on `device` would draw, drawn on the host (ops/rng.cpp).
  m.def("draw_seed_offset(Device device, Generator? generator) -> int[]", seeded);
}
