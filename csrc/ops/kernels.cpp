#include "ops/kernels.h"

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/masked.h"

namespace fused_dropout {

using at::Tensor;
using std::optional;

std::tuple<Tensor, Tensor> dropout_kernel(const Tensor& input, double p, int64_t mask_ndim,
                                          bool scale_by_keep, bool alpha, optional<int64_t> seed,
                                          optional<int64_t> offset,
                                          optional<at::Generator> generator) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout");
  Tensor out = at::empty_like(input);
  Tensor pair = run_masked(input, std::nullopt, std::nullopt, out, k,
                           make_affine(p, scale_by_keep, alpha, /*backward=*/false), rng);
  return {out, pair};
}

Tensor dropout_inplace_kernel(Tensor& input, double p, int64_t mask_ndim, bool scale_by_keep,
                              bool alpha, optional<int64_t> seed, optional<int64_t> offset,
                              optional<at::Generator> generator) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout_");
  at::assert_no_internal_overlap(input);
  return run_masked(input, std::nullopt, std::nullopt, input, k,
                    make_affine(p, scale_by_keep, alpha, /*backward=*/false), rng);
}

Tensor dropout_backward_kernel(const Tensor& grad, const Tensor& seed_offset, double p,
                               int64_t mask_ndim, bool scale_by_keep, bool alpha) {
  RngSource rng;
  rng.pair = &seed_offset;
  const int64_t k = check_op(grad, p, mask_ndim, rng, "dropout_backward");
  Tensor out = at::empty_like(grad);
  run_masked(grad, std::nullopt, std::nullopt, out, k,
             make_affine(p, scale_by_keep, alpha, /*backward=*/true), rng);
  return out;
}

std::tuple<Tensor, Tensor> dropout_add_kernel(const Tensor& input, const Tensor& residual,
                                              const optional<Tensor>& bias, double p,
                                              int64_t mask_ndim, bool scale_by_keep,
                                              optional<int64_t> seed, optional<int64_t> offset,
                                              optional<at::Generator> generator) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout_add");
  check_same(input, residual, "residual", "dropout_add");
  if (bias) check_bias(input, *bias, "dropout_add");
  Tensor out = at::empty_like(input);
  Tensor pair = run_masked(input, residual, bias, out, k,
                           make_affine(p, scale_by_keep, /*alpha=*/false, /*backward=*/false), rng);
  return {out, pair};
}

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout", dropout_kernel);
  m.impl("dropout_", dropout_inplace_kernel);
  m.impl("dropout_backward", dropout_backward_kernel);
  m.impl("dropout_add", dropout_add_kernel);
}

// Registered with or without CUDA kernels, so a CPU-only build gives a clear error.
TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) {
  m.impl("dropout", dropout_kernel);
  m.impl("dropout_", dropout_inplace_kernel);
  m.impl("dropout_backward", dropout_backward_kernel);
  m.impl("dropout_add", dropout_add_kernel);
}

}  // namespace fused_dropout
