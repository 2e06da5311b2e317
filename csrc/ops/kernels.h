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
                                                  std::optional<at::Generator> generator);

at::Tensor dropout_inplace_kernel(at::Tensor& input, double p, int64_t mask_ndim,
                                  bool scale_by_keep, bool alpha, std::optional<int64_t> seed,
                                  std::optional<int64_t> offset,
                                  std::optional<at::Generator> generator);

at::Tensor dropout_backward_kernel(const at::Tensor& grad, const at::Tensor& seed_offset, double p,
                                   int64_t mask_ndim, bool scale_by_keep, bool alpha);

std::tuple<at::Tensor, at::Tensor> dropout_add_kernel(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& bias,
    double p, int64_t mask_ndim, bool scale_by_keep, std::optional<int64_t> seed,
    std::optional<int64_t> offset, std::optional<at::Generator> generator);

}  // namespace fused_dropout
