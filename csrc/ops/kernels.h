// The device kernels of the ops (CPU and CUDA dispatch keys): checks, then one masked-op launch.
// The autograd layer calls them through the dispatcher with these signatures.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Generator.h>

#include <optional>
#include <tuple>

namespace fused_dropout {

std::tuple<at::Tensor, at::Tensor> dropout_kernel(const at::Tensor& input, double p,
                                                  int64_t mask_ndim, bool scale_by_keep, bool alpha,
                                                  std::optional<int64_t> seed,
                                                  std::optional<int64_t> offset,
                                                  std::optional<at::Generator> generator,
                                                  at::OptionalIntArrayRef global_shape,
                                                  at::OptionalIntArrayRef global_offset);

at::Tensor dropout_inplace_kernel(at::Tensor& input, double p, int64_t mask_ndim,
                                  bool scale_by_keep, bool alpha, std::optional<int64_t> seed,
                                  std::optional<int64_t> offset,
                                  std::optional<at::Generator> generator,
                                  at::OptionalIntArrayRef global_shape,
                                  at::OptionalIntArrayRef global_offset);

at::Tensor dropout_backward_kernel(const at::Tensor& grad, const at::Tensor& seed_offset, double p,
                                   int64_t mask_ndim, bool scale_by_keep, bool alpha,
                                   at::OptionalIntArrayRef global_shape,
                                   at::OptionalIntArrayRef global_offset);

std::tuple<at::Tensor, at::Tensor> dropout_add_kernel(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& bias,
    double p, int64_t mask_ndim, bool scale_by_keep, std::optional<int64_t> seed,
    std::optional<int64_t> offset, std::optional<at::Generator> generator,
    at::OptionalIntArrayRef global_shape, at::OptionalIntArrayRef global_offset);

// The fused dropout + residual add + norm (ops/fused_norm.cpp): y, h (empty unless keep_h),
// mean (empty for RMSNorm), rstd (per row, in the compute type) and the pair used.
// memory_efficient is autograd's (what backward keeps); the kernel does not read it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_kernel(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& input_bias, double p, double eps, bool rms, bool per_sample,
    bool residual_in_fp32, bool keep_h, bool memory_efficient, std::optional<int64_t> seed,
    std::optional<int64_t> offset, std::optional<at::Generator> generator);

// Its backward from `saved`: h as stored, or (saved_is_y) y as stored, with the forward's
// weight and bias. Returns grad_input, grad_h (the residual's, in h's dtype; empty unless asked
// for), and the column sums grad_weight, grad_bias, grad_input_bias in the compute type (each
// empty unless asked for).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dropout_add_norm_backward_kernel(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h,
                                 const at::Tensor& saved, bool saved_is_y,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                 const at::Tensor& rstd, const at::Tensor& seed_offset, double p,
                                 bool rms, bool per_sample, bool residual_in_fp32, bool want_grad_h,
                                 bool want_grad_weight, bool want_grad_bias,
                                 bool want_grad_input_bias);

}  // namespace fused_dropout
