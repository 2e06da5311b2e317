#include "ops/checks.h"

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

}  // namespace

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

int64_t check_op(const at::Tensor& input, double p, int64_t mask_ndim, const RngSource& rng,
                 const char* op) {
  check_p(p);
  kernel_dtype(input, op);
  check_device(input, op);
  check_rng(rng, input, op);
  return mask_dims(input, mask_ndim, op);
}

}  // namespace fused_dropout
