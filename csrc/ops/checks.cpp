#include "ops/checks.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace fused_dropout {
namespace {

void check_p(double p) {
  // NaN fails both comparisons.
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ",
                    p);
}

void check_device(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "fused_dropout.", op,
              ": expected a CPU or CUDA tensor, but got one on ", t.device());
#ifndef FUSED_DROPOUT_WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), "fused_dropout.", op,
              ": this build of fused_dropout has no CUDA kernels (no GPU and no "
              "FUSED_DROPOUT_BUILD_CUDA=1 when it was compiled); clear the extension cache and "
              "import it on a machine with a GPU");
#endif
}

int64_t mask_dims(const at::Tensor& input, int64_t mask_ndim, const char* op) {
  const int64_t ndim = input.dim();
  TORCH_CHECK(mask_ndim >= -1 && mask_ndim <= ndim, "fused_dropout.", op,
              ": mask_ndim must be -1 (element-wise) or in [0, ", ndim, "], got ", mask_ndim);
  return mask_ndim == -1 ? ndim : mask_ndim;
}

void check_rng(const RngSource& rng, const at::Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(rng.seed.has_value() == rng.offset.has_value(), "fused_dropout.", op,
                    ": seed and offset must be given together");
  if (rng.offset) {
    TORCH_CHECK_VALUE(*rng.offset >= 0 && *rng.offset % 4 == 0, "fused_dropout.", op,
                      ": offset must be a non-negative multiple of 4, got ", *rng.offset);
  }
  if (rng.pair) {
    const at::Tensor& pair = *rng.pair;
    TORCH_CHECK(pair.scalar_type() == at::kLong && pair.numel() == 2 && pair.is_contiguous() &&
                    pair.device() == input.device(),
                "fused_dropout.", op, ": seed_offset must be an int64 tensor of 2 elements on ",
                input.device(), ", got ", pair.scalar_type(), " ", pair.sizes(), " on ",
                pair.device());
  }
}

// Whether two elements of `t` share an address. at::has_internal_overlap answers only the
// easy cases (a stride of 0); this also finds overlapping windows (as_strided), exactly.
bool has_internal_overlap(const at::Tensor& t) {
  const at::MemOverlap easy = at::has_internal_overlap(t);
  if (easy != at::MemOverlap::TooHard) return easy == at::MemOverlap::Yes;
  if (t.numel() <= 1 || t.is_non_overlapping_and_dense()) return false;
  // Dims by increasing stride: no overlap if each stride passes the extent of the smaller ones.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = 0;
  bool separated = true;
  for (const auto& [stride, size] : dims) {
    separated = separated && stride > extent;
    extent += (size - 1) * stride;
  }
  if (separated) return false;
  // A rare interleaved layout: compare the offsets of all elements.
  at::Tensor offsets = at::zeros({}, at::kLong);
  for (const auto& [stride, size] : dims) {
    offsets = offsets.unsqueeze(-1) + at::arange(size, at::kLong) * stride;
  }
  const at::Tensor sorted = std::get<0>(offsets.flatten().sort());
  return sorted.slice(0, 1).eq(sorted.slice(0, 0, -1)).any().item<bool>();
}

}  // namespace

void check_inplace(const at::Tensor& input, const char* op) {
  TORCH_CHECK(!has_internal_overlap(input), "fused_dropout.", op,
              ": more than one element of the written-to tensor (input) refers to a single "
              "memory location (an expanded or overlapping view). Please clone() the tensor "
              "before performing the operation, or use inplace=False.");
}

DType kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      // torch's F.dropout raises NotImplementedError for complex, RuntimeError for the rest.
      TORCH_CHECK_NOT_IMPLEMENTED(!at::isComplexType(t.scalar_type()), "fused_dropout.", op,
                                  ": expected a floating-point tensor (float32, float64, float16 "
                                  "or bfloat16), but got ",
                                  t.scalar_type());
      TORCH_CHECK(false, "fused_dropout.", op,
                  ": expected a floating-point tensor (float32, float64, float16 or "
                  "bfloat16), but got ",
                  t.scalar_type());
  }
}

void check_same(const at::Tensor& input, const at::Tensor& other, const char* name,
                const char* op) {
  TORCH_CHECK(other.device() == input.device(), "fused_dropout.", op, ": ", name, " is on ",
              other.device(), " but input is on ", input.device());
  TORCH_CHECK_TYPE(other.scalar_type() == input.scalar_type(), "fused_dropout.", op, ": ", name,
                   " has dtype ", other.scalar_type(), " but input has dtype ", input.scalar_type(),
                   " (cast one of them; no type promotion is done)");
  TORCH_CHECK(other.sizes() == input.sizes(), "fused_dropout.", op, ": ", name, " has shape ",
              other.sizes(), " but input has shape ", input.sizes());
}

void check_bias(const at::Tensor& input, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(input.dim() >= 1, "fused_dropout.", op,
              ": a bias needs an input with at least one dimension");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == input.size(-1), "fused_dropout.", op,
              ": bias must be 1-D with input.size(-1) = ", input.size(-1), " elements, got shape ",
              bias.sizes());
  TORCH_CHECK(bias.device() == input.device(), "fused_dropout.", op, ": bias is on ", bias.device(),
              " but input is on ", input.device());
  TORCH_CHECK_TYPE(bias.scalar_type() == input.scalar_type(), "fused_dropout.", op,
                   ": bias has dtype ", bias.scalar_type(), " but input has dtype ",
                   input.scalar_type());
}

void check_row_vector(const at::Tensor& input, const at::Tensor& v, const char* name, bool fp32_ok,
                      const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == input.size(-1), "fused_dropout.", op, ": ", name,
              " must be 1-D with input.size(-1) = ", input.size(-1), " elements, got shape ",
              v.sizes());
  TORCH_CHECK(v.device() == input.device(), "fused_dropout.", op, ": ", name, " is on ", v.device(),
              " but input is on ", input.device());
  TORCH_CHECK_TYPE(
      v.scalar_type() == input.scalar_type() || (fp32_ok && v.scalar_type() == at::kFloat),
      "fused_dropout.", op, ": ", name, " has dtype ", v.scalar_type(), " but input has dtype ",
      input.scalar_type(), fp32_ok ? " (it may be float32 or the input's dtype)" : "");
}

MaskBox check_box(const at::Tensor& input, int64_t k, at::OptionalIntArrayRef global_shape,
                  at::OptionalIntArrayRef global_offset, const char* op) {
  TORCH_CHECK_VALUE(global_shape.has_value() == global_offset.has_value(), "fused_dropout.", op,
                    ": global_shape and global_offset must be given together");
  MaskBox box;
  if (!global_shape) return box;
  const at::IntArrayRef shape = *global_shape, start = *global_offset, local = input.sizes();
  const int64_t ndim = input.dim();
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(shape.size()) == ndim && static_cast<int64_t>(start.size()) == ndim,
      "fused_dropout.", op,
      ": global_shape and global_offset must have one entry per "
      "dim of the input (",
      ndim, "), got ", shape, " and ", start);
  for (int64_t d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(start[d] >= 0 && shape[d] >= 0 && start[d] + local[d] <= shape[d],
                      "fused_dropout.", op, ": the input (shape ", local, ") at global_offset ",
                      start, " is not inside global_shape ", shape, " (dim ", d, ")");
  }
  if (input.numel() == 0) return box;
  // Global strides of the mask dims; dims of local size 1 only add to the base.
  std::vector<int64_t> stride(k);
  for (int64_t d = k - 1, s = 1; d >= 0; --d) {
    stride[d] = s;
    s *= shape[d];
  }
  // (local size, global stride) of the dims of local size > 1, inner first, merged where the
  // outer one steps over exactly the inner one's run.
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = k - 1; d >= 0; --d) {
    box.base += start[d] * stride[d];
    if (local[d] == 1) continue;
    if (!dims.empty() && stride[d] == dims.back().first * dims.back().second) {
      dims.back().first *= local[d];
    } else {
      dims.emplace_back(local[d], stride[d]);
    }
  }
  if (dims.empty()) {  // one mask element
    box.seg = 1, box.seg_stride = 0;
  } else if (dims.size() == 1 && dims[0].second == 1) {  // consecutive
    box.seg = box.seg_stride = dims[0].first;
  } else if (dims.size() == 1) {  // one element per stride
    box.seg = 1, box.seg_stride = dims[0].second;
  } else {
    TORCH_CHECK_NOT_IMPLEMENTED(
        dims.size() == 2 && dims[0].second == 1, "fused_dropout.", op, ": the box of shape ", local,
        " at ", start, " in ", shape,
        " is sharded along more than one dim of the mask (over the leading ", k,
        " dims); only one sharded mask dim (and dims of local size 1) is supported");
    box.seg = dims[0].first, box.seg_stride = dims[1].second;
  }
  box.boxed = !(box.base == 0 && box.seg_stride == box.seg);
  return box;
}

int64_t check_op(const at::Tensor& input, double p, int64_t mask_ndim, const RngSource& rng,
                 const char* op) {
  check_p(p);
  kernel_dtype(input, op);
  check_device(input, op);
  check_rng(rng, input, op);
  return mask_dims(input, mask_ndim, op);
}

}  // namespace fused_dropout
