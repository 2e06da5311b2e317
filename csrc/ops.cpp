// Every schema of the library, in one place. The implementations register themselves:
// ops/kernels.cpp for the CPU and CUDA keys, ops/autograd.cpp for Autograd, ops/rng.cpp for
// draw_seed_offset and ops/cpu_dispatch.cpp for the cpu_capability ops (no tensor to dispatch
// on: one kernel for every device), and fused_dropout/ops.py holds the fake (meta) kernels.
#include <torch/library.h>

// global_shape / global_offset (dropout, dropout_, dropout_backward, dropout_add): the input is
// the slice [global_offset, global_offset + input.shape) of a logical tensor of global_shape, and
// its mask is that logical tensor's, indexed by global position (ops/checks.h's check_box).
TORCH_LIBRARY(fused_dropout, m) {
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def(
      "dropout(Tensor input, float p, int mask_ndim, bool scale_by_keep, bool alpha, int? seed, "
      "int? offset, Generator? generator, SymInt[]? global_shape=None, SymInt[]? "
      "global_offset=None) -> (Tensor, Tensor)",
      seeded);
  m.def(
      "dropout_(Tensor(a!) input, float p, int mask_ndim, bool scale_by_keep, bool alpha, "
      "int? seed, int? offset, Generator? generator, SymInt[]? global_shape=None, SymInt[]? "
      "global_offset=None) -> Tensor",
      seeded);
  m.def(
      "dropout_backward(Tensor grad, Tensor seed_offset, float p, int mask_ndim, "
      "bool scale_by_keep, bool alpha, SymInt[]? global_shape=None, SymInt[]? global_offset=None) "
      "-> Tensor");
  m.def(
      "dropout_add(Tensor input, Tensor residual, Tensor? bias, float p, int mask_ndim, "
      "bool scale_by_keep, int? seed, int? offset, Generator? generator, SymInt[]? "
      "global_shape=None, SymInt[]? global_offset=None) -> "
      "(Tensor, Tensor)",
      seeded);
  // h = residual + dropout(input + input_bias), y = norm(h) * weight + bias over the last dim
  // (LayerNorm, or RMSNorm with rms): y, h (empty unless keep_h), the rows' mean (empty for
  // RMSNorm) and rstd, and the pair. memory_efficient: backward keeps y (which the next layer
  // keeps anyway) instead of h, and recovers xhat = (y - bias) / weight; weight has no zeros.
  m.def(
      "dropout_add_norm(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor? input_bias, float p, float eps, bool rms, bool per_sample, bool residual_in_fp32, "
      "bool keep_h, bool memory_efficient, int? seed, int? offset, Generator? generator) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)",
      seeded);
  m.def(
      "dropout_add_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor saved, bool saved_is_y, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, Tensor seed_offset, float p, "
      "bool rms, bool per_sample, bool residual_in_fp32, "
      "bool want_grad_h, bool want_grad_weight, bool want_grad_bias, bool want_grad_input_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The pair the next op call on `device` would draw, drawn on the host (ops/rng.cpp).
  m.def("draw_seed_offset(Device device, Generator? generator) -> int[]", seeded);
  // The CPU kernels' capability (ops/cpu_dispatch.cpp): the one in use, those built, what this
  // CPU lacks for one, and a switch for this process (returns the previous one).
  m.def("cpu_capability() -> str");
  m.def("cpu_capabilities() -> str[]");
  m.def("cpu_capability_missing(str capability) -> str[]");
  m.def("set_cpu_capability(str capability) -> str");
}
