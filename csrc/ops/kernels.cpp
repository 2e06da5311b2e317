#include "ops/kernels.h"

#include <torch/library.h>

#include "ops/checks.h"
#include "ops/masked.h"

namespace fused_dropout {

using at::Tensor;
using std::optional;

std::tuple<Tensor, Tensor> dropout_kernel(const Tensor& input, double p, int64_t mask_ndim,
                                          bool scale_by_keep, bool alpha, optional<int64_t> seed,
                                          optional<int64_t> offset,
                                          optional<at::Generator> generator,
                                          at::OptionalIntArrayRef global_shape,
                                          at::OptionalIntArrayRef global_offset) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout");
  const MaskBox box = check_box(input, k, global_shape, global_offset, "dropout");
  Tensor out = at::empty_like(input);
  Tensor pair = run_masked(input, std::nullopt, std::nullopt, out, k,
                           make_affine(p, scale_by_keep, alpha, /*backward=*/false), rng, box);
  return {out, pair};
}

Tensor dropout_inplace_kernel(Tensor& input, double p, int64_t mask_ndim, bool scale_by_keep,
                              bool alpha, optional<int64_t> seed, optional<int64_t> offset,
                              optional<at::Generator> generator,
                              at::OptionalIntArrayRef global_shape,
                              at::OptionalIntArrayRef global_offset) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout_");
  const MaskBox box = check_box(input, k, global_shape, global_offset, "dropout_");
  check_inplace(input, "dropout_");
  return run_masked(input, std::nullopt, std::nullopt, input, k,
                    make_affine(p, scale_by_keep, alpha, /*backward=*/false), rng, box);
}

Tensor dropout_backward_kernel(const Tensor& grad, const Tensor& seed_offset, double p,
                               int64_t mask_ndim, bool scale_by_keep, bool alpha,
                               at::OptionalIntArrayRef global_shape,
                               at::OptionalIntArrayRef global_offset) {
  RngSource rng;
  rng.pair = &seed_offset;
  const int64_t k = check_op(grad, p, mask_ndim, rng, "dropout_backward");
  const MaskBox box = check_box(grad, k, global_shape, global_offset, "dropout_backward");
  Tensor out = at::empty_like(grad);
  run_masked(grad, std::nullopt, std::nullopt, out, k,
             make_affine(p, scale_by_keep, alpha, /*backward=*/true), rng, box);
  return out;
}

std::tuple<Tensor, Tensor> dropout_add_kernel(const Tensor& input, const Tensor& residual,
                                              const optional<Tensor>& bias, double p,
                                              int64_t mask_ndim, bool scale_by_keep,
                                              optional<int64_t> seed, optional<int64_t> offset,
                                              optional<at::Generator> generator,
                                              at::OptionalIntArrayRef global_shape,
                                              at::OptionalIntArrayRef global_offset) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout_add");
  check_same(input, residual, "residual", "dropout_add");
  if (bias) check_bias(input, *bias, "dropout_add");
  const MaskBox box = check_box(input, k, global_shape, global_offset, "dropout_add");
  Tensor out = at::empty_like(input);
  Tensor pair =
      run_masked(input, residual, bias, out, k,
                 make_affine(p, scale_by_keep, /*alpha=*/false, /*backward=*/false), rng, box);
  return {out, pair};
}

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout", dropout_kernel);
  m.impl("dropout_", dropout_inplace_kernel);
  m.impl("dropout_backward", dropout_backward_kernel);
  m.impl("dropout_add", dropout_add_kernel);
  m.impl("dropout_add_norm", dropout_add_norm_kernel);
  m.impl("dropout_add_norm_backward", dropout_add_norm_backward_kernel);
}

namespace {

// Sparse and quantized tensors dispatch here instead of to torch's generic "could not run
// with arguments from the 'SparseCPU' backend"; the error names the argument and the fix.
void not_dense(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!v.isTensor()) continue;
    const Tensor& t = v.toTensor();
    if (t.layout() == at::kStrided && !t.is_quantized()) continue;
    const std::string& name = args[i].name();
    TORCH_CHECK_NOT_IMPLEMENTED(false, schema.name(), ": ", name, " is a ",
                                t.is_quantized() ? std::string("quantized") : c10::str(t.layout()),
                                " tensor, but only dense (strided) tensors are supported; pass ",
                                name, t.is_quantized() ? ".dequantize()" : ".to_dense()");
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, schema.name(), ": only dense (strided) tensors are supported");
}

}  // namespace

#define FUSED_DROPOUT_NOT_DENSE(key)                                                 \
  TORCH_LIBRARY_IMPL(fused_dropout, key, m) {                                        \
    for (const char* op : {"dropout", "dropout_", "dropout_backward", "dropout_add", \
                           "dropout_add_norm", "dropout_add_norm_backward"}) {       \
      m.impl(op, torch::CppFunction::makeFromBoxedFunction<&not_dense>());           \
    }                                                                                \
  }
FUSED_DROPOUT_NOT_DENSE(SparseCPU)
FUSED_DROPOUT_NOT_DENSE(SparseCUDA)
FUSED_DROPOUT_NOT_DENSE(SparseCsrCPU)
FUSED_DROPOUT_NOT_DENSE(SparseCsrCUDA)
FUSED_DROPOUT_NOT_DENSE(QuantizedCPU)
FUSED_DROPOUT_NOT_DENSE(QuantizedCUDA)
#undef FUSED_DROPOUT_NOT_DENSE

// Registered with or without CUDA kernels, so a CPU-only build gives a clear error.
TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) {
  m.impl("dropout", dropout_kernel);
  m.impl("dropout_", dropout_inplace_kernel);
  m.impl("dropout_backward", dropout_backward_kernel);
  m.impl("dropout_add", dropout_add_kernel);
  m.impl("dropout_add_norm", dropout_add_norm_kernel);
  m.impl("dropout_add_norm_backward", dropout_add_norm_backward_kernel);
}

}  // namespace fused_dropout
