// The device kernels of the fused dropout + residual add + norm (declared in ops/kernels.h):
// checks, contiguous operands, outputs, the pair, and the CPU or CUDA launch.
#include <ATen/ATen.h>

#include "cpu/norm.h"
#include "ops/checks.h"
#include "ops/kernels.h"

#ifdef FUSED_DROPOUT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/norm.h"
#include "ops/rng.h"
#endif

namespace fused_dropout {
namespace {

using at::Tensor;
using std::optional;

constexpr const char* kOp = "dropout_add_norm";

// h (and a residual with residual_in_fp32) is fp32 for the 16-bit dtypes, else the dtype.
bool wide_h(const Tensor& input, bool residual_in_fp32) {
  return residual_in_fp32 &&
         (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16);
}

at::ScalarType compute_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows sharing one mask element (per_sample: the rows of a sample), or 0 (element-wise).
int64_t rows_per_sample(const Tensor& input, bool per_sample) {
  if (!per_sample || input.dim() < 2) return 0;  // a 1-D input's samples are its elements
  return std::max<int64_t>(1, c10::multiply_integers(input.sizes().slice(1, input.dim() - 2)));
}

optional<Tensor> contiguous(const optional<Tensor>& t) {
  return t ? optional<Tensor>(t->contiguous()) : std::nullopt;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dropout_add_norm_kernel(
    const Tensor& input, const optional<Tensor>& residual, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& input_bias, double p, double eps,
    bool rms, bool per_sample, bool residual_in_fp32, bool keep_h, bool /*memory_efficient*/,
    optional<int64_t> seed, optional<int64_t> offset, optional<at::Generator> generator) {
  const RngSource rng{seed, offset, generator};
  check_op(input, p, -1, rng, kOp);
  TORCH_CHECK(input.dim() >= 1, "fused_dropout.", kOp,
              ": input must have at least one dimension (the normalized one)");
  const bool wide = wide_h(input, residual_in_fp32);
  if (residual) {
    TORCH_CHECK(residual->device() == input.device(), "fused_dropout.", kOp, ": residual is on ",
                residual->device(), " but input is on ", input.device());
    TORCH_CHECK_TYPE(residual->scalar_type() == input.scalar_type() ||
                         (residual_in_fp32 && residual->scalar_type() == at::kFloat),
                     "fused_dropout.", kOp, ": residual has dtype ", residual->scalar_type(),
                     " but input has dtype ", input.scalar_type(),
                     residual_in_fp32 ? " (with residual_in_fp32 it may also be float32)" : "");
    TORCH_CHECK(residual->sizes() == input.sizes(), "fused_dropout.", kOp, ": residual has shape ",
                residual->sizes(), " but input has shape ", input.sizes());
  }
  if (weight) check_row_vector(input, *weight, "weight", true, kOp);
  if (bias) {
    check_row_vector(input, *bias, "bias", true, kOp);
    TORCH_CHECK_TYPE(!weight || bias->scalar_type() == weight->scalar_type(), "fused_dropout.", kOp,
                     ": bias has dtype ", bias->scalar_type(), " but weight has dtype ",
                     weight ? weight->scalar_type() : bias->scalar_type());
  }
  if (input_bias) check_row_vector(input, *input_bias, "input_bias", false, kOp);

  const int64_t cols = input.size(-1);
  const int64_t rows = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  const at::ScalarType h_type = wide ? at::kFloat : input.scalar_type();
  const auto acc = input.options().dtype(compute_type(input));
  Tensor y = at::empty(input.sizes(), input.options());
  Tensor h = at::empty(keep_h ? input.sizes() : at::IntArrayRef{0}, input.options().dtype(h_type));
  Tensor mean = at::empty({rms ? 0 : rows}, acc);
  Tensor rstd = at::empty({rows}, acc);

  const Tensor x = input.contiguous();
  const optional<Tensor> r =
      residual ? optional<Tensor>(residual->to(h_type).contiguous()) : std::nullopt;
  const optional<Tensor> w = contiguous(weight), b = contiguous(bias), ib = contiguous(input_bias);
  NormForwardArgs args;
  args.dtype = kernel_dtype(input, kOp);
  args.wide_h = wide;
  const optional<Tensor>& wb = w ? w : b;
  args.weight_fp32 = wb && wb->scalar_type() == at::kFloat && input.scalar_type() != at::kFloat;
  args.rms = rms;
  args.input = x.const_data_ptr();
  args.residual = r ? r->const_data_ptr() : nullptr;
  args.input_bias = ib ? ib->const_data_ptr() : nullptr;
  args.weight = w ? w->const_data_ptr() : nullptr;
  args.bias = b ? b->const_data_ptr() : nullptr;
  args.y = y.mutable_data_ptr();
  args.h = keep_h ? h.mutable_data_ptr() : nullptr;
  args.mean = rms ? nullptr : mean.mutable_data_ptr();
  args.rstd = rstd.mutable_data_ptr();
  args.rows = rows;
  args.cols = cols;
  args.rows_per_sample = rows_per_sample(input, per_sample);
  args.eps = eps;
  args.affine = make_affine(p, true, false, false);

  const bool draw = !args.affine.keep_all && input.numel() > 0;
  Tensor pair;
  if (input.is_cpu()) {
    const auto [s, o] = cpu_pair(rng, draw);
    norm_forward_cpu(args, s, o);
    pair = at::empty({2}, input.options().dtype(at::kLong));
    pair.data_ptr<int64_t>()[0] = static_cast<int64_t>(s);
    pair.data_ptr<int64_t>()[1] = static_cast<int64_t>(o);
  } else {
#ifdef FUSED_DROPOUT_WITH_CUDA
    c10::cuda::CUDAGuard guard(input.device());
    const at::PhiloxCudaState philox = cuda_philox_state(rng, draw, input.device().index());
    pair = at::empty({2}, input.options().dtype(at::kLong));  // the kernel writes the pair used
    C10_CUDA_CHECK(
        norm_forward_cuda(args, philox, pair.mutable_data_ptr<int64_t>(),
                          c10::cuda::getCurrentCUDAStream(input.device().index()).stream()));
#else
    TORCH_CHECK_NOT_IMPLEMENTED(false, "fused_dropout.", kOp, ": this build has no CUDA kernels");
#endif
  }
  return {y, h, mean, rstd, pair};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dropout_add_norm_backward_kernel(
    const Tensor& grad_y, const optional<Tensor>& grad_h, const Tensor& saved, bool saved_is_y,
    const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& mean,
    const Tensor& rstd, const Tensor& seed_offset, double p, bool rms, bool per_sample,
    bool residual_in_fp32, bool want_grad_h, bool want_grad_weight, bool want_grad_bias,
    bool want_grad_input_bias) {
  constexpr const char* op = "dropout_add_norm_backward";
  RngSource rng;
  rng.pair = &seed_offset;
  check_op(grad_y, p, -1, rng, op);
  const bool wide = wide_h(grad_y, residual_in_fp32);
  const at::ScalarType h_type = wide ? at::kFloat : grad_y.scalar_type();
  const at::ScalarType saved_type = saved_is_y ? grad_y.scalar_type() : h_type;
  TORCH_CHECK(grad_y.dim() >= 1 && saved.sizes() == grad_y.sizes() &&
                  saved.device() == grad_y.device() && saved.scalar_type() == saved_type,
              "fused_dropout.", op, ": saved (", saved_is_y ? "y" : "h",
              ") must have grad_y's shape ", grad_y.sizes(), ", device and dtype ", saved_type,
              ", got ", saved.sizes(), " ", saved.scalar_type(), " on ", saved.device());
  if (grad_h) {
    TORCH_CHECK(grad_h->sizes() == grad_y.sizes() && grad_h->scalar_type() == h_type &&
                    grad_h->device() == grad_y.device(),
                "fused_dropout.", op, ": grad_h must match h (shape ", grad_y.sizes(), ", dtype ",
                h_type, ")");
  }
  if (weight) check_row_vector(grad_y, *weight, "weight", true, op);
  if (bias) {
    check_row_vector(grad_y, *bias, "bias", true, op);
    TORCH_CHECK_TYPE(!weight || bias->scalar_type() == weight->scalar_type(), "fused_dropout.", op,
                     ": bias has dtype ", bias->scalar_type(), " but weight has dtype ",
                     weight ? weight->scalar_type() : bias->scalar_type());
  }
  // xhat = (y - bias) / weight is lost where a weight is 0: checked where it is cheap (the CPU).
  TORCH_CHECK(!saved_is_y || !weight || !weight->is_cpu() || !weight->eq(0).any().item<bool>(),
              "fused_dropout.", op,
              ": memory_efficient=True needs a weight with no zeros (xhat = (y - bias) / weight); "
              "use memory_efficient=False");
  const int64_t cols = grad_y.size(-1);
  const int64_t rows = c10::multiply_integers(grad_y.sizes().slice(0, grad_y.dim() - 1));
  const auto acc = grad_y.options().dtype(compute_type(grad_y));
  const bool needs_mean = !rms && !saved_is_y;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == acc.dtype() &&
                  (!needs_mean || (mean.numel() == rows && mean.scalar_type() == acc.dtype())),
              "fused_dropout.", op, ": mean and rstd must hold one ", acc.dtype(), " per row (",
              rows, ")");

  Tensor grad_input = at::empty(grad_y.sizes(), grad_y.options());
  Tensor grad_h_out =
      at::empty(want_grad_h ? grad_y.sizes() : at::IntArrayRef{0}, grad_y.options().dtype(h_type));
  const auto column = [&](bool want) { return at::empty({want ? cols : 0}, acc); };
  Tensor grad_weight = column(want_grad_weight), grad_bias = column(want_grad_bias),
         grad_input_bias = column(want_grad_input_bias);
  const int64_t sums = want_grad_weight + want_grad_bias + want_grad_input_bias;
  Tensor partials = at::empty({sums, row_blocks(rows), cols}, acc);

  const Tensor dy = grad_y.contiguous(), saved_c = saved.contiguous();
  const optional<Tensor> dh_in = contiguous(grad_h), w = contiguous(weight), b = contiguous(bias);
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  NormBackwardArgs args;
  args.dtype = kernel_dtype(grad_y, op);
  args.wide_h = wide;
  const optional<Tensor>& wb = w ? w : b;
  args.weight_fp32 = wb && wb->scalar_type() == at::kFloat && grad_y.scalar_type() != at::kFloat;
  args.rms = rms;
  args.dy = dy.const_data_ptr();
  args.dh_in = dh_in ? dh_in->const_data_ptr() : nullptr;
  args.saved = saved_c.const_data_ptr();
  args.saved_is_y = saved_is_y;
  args.weight = w ? w->const_data_ptr() : nullptr;
  args.bias = saved_is_y && b ? b->const_data_ptr() : nullptr;
  args.mean = needs_mean ? mean_c.const_data_ptr() : nullptr;
  args.rstd = rstd_c.const_data_ptr();
  args.grad_input = grad_input.mutable_data_ptr();
  args.grad_h = want_grad_h ? grad_h_out.mutable_data_ptr() : nullptr;
  args.grad_weight = want_grad_weight ? grad_weight.mutable_data_ptr() : nullptr;
  args.grad_bias = want_grad_bias ? grad_bias.mutable_data_ptr() : nullptr;
  args.grad_input_bias = want_grad_input_bias ? grad_input_bias.mutable_data_ptr() : nullptr;
  args.partials = partials.mutable_data_ptr();
  args.rows = rows;
  args.cols = cols;
  args.rows_per_sample = rows_per_sample(grad_y, per_sample);
  args.affine = make_affine(p, true, false, true);

  if (grad_y.is_cpu()) {
    const auto [s, o] = cpu_pair(rng, true);
    norm_backward_cpu(args, s, o);
  } else {
#ifdef FUSED_DROPOUT_WITH_CUDA
    c10::cuda::CUDAGuard guard(grad_y.device());
    // check_op checked the pair (int64[2], contiguous, on grad_y's device): read by the kernel
    C10_CUDA_CHECK(
        norm_backward_cuda(args, seed_offset.const_data_ptr<int64_t>(),
                           c10::cuda::getCurrentCUDAStream(grad_y.device().index()).stream()));
#else
    TORCH_CHECK_NOT_IMPLEMENTED(false, "fused_dropout.", op, ": this build has no CUDA kernels");
#endif
  }
  return {grad_input, grad_h_out, grad_weight, grad_bias, grad_input_bias};
}

}  // namespace fused_dropout
