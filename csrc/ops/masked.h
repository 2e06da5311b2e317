// One masked op call: the kernel layout for the operands, the pair, and the CPU or CUDA launch.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "core/masked_op.h"
#include "ops/checks.h"
#include "ops/rng.h"

namespace fused_dropout {

// Runs one masked op into `out` (which may be `input`) and returns the (seed, offset) pair
// used as an int64[2] tensor on the input's device. The mask covers the leading k dims.
// The arguments must have passed check_op (and check_same / check_bias); box is check_box's.
at::Tensor run_masked(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& bias, at::Tensor& out, int64_t k,
                      const MaskedAffine& affine, const RngSource& rng, const MaskBox& box = {});

}  // namespace fused_dropout
