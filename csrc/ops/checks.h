// The argument checks every op runs before anything is written.
#pragma once

#include <ATen/ATen.h>

#include "core/masked_op.h"
#include "ops/rng.h"

namespace fused_dropout {

// The kernel dtype of a floating-point tensor; a RuntimeError (as torch's) for others.
DType kernel_dtype(const at::Tensor& t, const char* op);

// `other` (a residual) must match the input exactly: no broadcasting, no promotion.
void check_same(const at::Tensor& input, const at::Tensor& other, const char* name, const char* op);

// A bias of dropout_add: 1-D over the input's last dim, same device and dtype.
void check_bias(const at::Tensor& input, const at::Tensor& bias, const char* op);

// An in-place input must not have two elements at one address (torch's message, and more cases).
void check_inplace(const at::Tensor& input, const char* op);

// The [cols] vector `name` of a fused norm (weight, bias, input_bias): 1-D, as long as the
// input's last dim, on its device, in the input's dtype (or fp32 where fp32_ok).
void check_row_vector(const at::Tensor& input, const at::Tensor& v, const char* name, bool fp32_ok,
                      const char* op);

// The box of a call (global_shape, global_offset): the input is the slice
// [global_offset, global_offset + input.sizes()) of a logical tensor of global_shape, and its
// mask (over the leading k dims) is indexed by the global row-major position. Checks it and
// returns MaskMap's box fields (boxed false: the box is the whole tensor, or none was given).
// Supported: boxes whose mask indices are runs of consecutive global ones at one stride, which
// covers one sharded mask dim (Shard(d) for any d, batch sharding) and dims of local size 1.
struct MaskBox {
  bool boxed = false;
  int64_t base = 0, seg = 1, seg_stride = 1;
};
MaskBox check_box(const at::Tensor& input, int64_t k, at::OptionalIntArrayRef global_shape,
                  at::OptionalIntArrayRef global_offset, const char* op);

// p, dtype, device, the RNG source and mask_ndim; returns the mask's number of leading dims.
int64_t check_op(const at::Tensor& input, double p, int64_t mask_ndim, const RngSource& rng,
                 const char* op);

}  // namespace fused_dropout
