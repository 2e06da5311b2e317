// Every schema of the library, the checks that run before anything is
// written, the choice of kernel layout, the (seed, offset) plumbing, and the
// autograd that saves only that pair.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Generator.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include "core/masked_op.h"
#include "cpu/dropout.h"

#ifdef FUSED_DROPOUT_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/dropout.h"
#endif

namespace fused_dropout {
namespace {

using at::Tensor;
using std::optional;

// ---------------------------------------------------------------- checks

void check_p(double p) {
  // NaN fails both comparisons.
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ",
                    p);
}

// A RuntimeError, as torch raises for integer or complex dropout.
DType kernel_dtype(const Tensor& t, const char* op) {
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

void check_device(const Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "fused_dropout.", op,
              ": expected a CPU or CUDA tensor, but got one on ", t.device());
#ifndef FUSED_DROPOUT_WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), "fused_dropout.", op,
              ": this build of fused_dropout has no CUDA kernels (no GPU and no "
              "FUSED_DROPOUT_BUILD_CUDA=1 when it was compiled); clear the extension cache and "
              "import it on a machine with a GPU");
#endif
}

// A second operand must match the input exactly: no broadcasting, no promotion.
void check_same(const Tensor& input, const Tensor& other, const char* name, const char* op) {
  TORCH_CHECK(other.device() == input.device(), "fused_dropout.", op, ": ", name, " is on ",
              other.device(), " but input is on ", input.device());
  TORCH_CHECK_TYPE(other.scalar_type() == input.scalar_type(), "fused_dropout.", op, ": ", name,
                   " has dtype ", other.scalar_type(), " but input has dtype ", input.scalar_type(),
                   " (cast one of them; no type promotion is done)");
  TORCH_CHECK(other.sizes() == input.sizes(), "fused_dropout.", op, ": ", name, " has shape ",
              other.sizes(), " but input has shape ", input.sizes());
}

int64_t mask_dims(const Tensor& input, int64_t mask_ndim, const char* op) {
  const int64_t ndim = input.dim();
  TORCH_CHECK(mask_ndim >= -1 && mask_ndim <= ndim, "fused_dropout.", op,
              ": mask_ndim must be -1 (element-wise) or in [0, ", ndim, "], got ", mask_ndim);
  return mask_ndim == -1 ? ndim : mask_ndim;
}

// ---------------------------------------------------------------- RNG

// Where the (seed, offset) pair of one call comes from.
struct RngSource {
  optional<int64_t> seed, offset;     // explicit pair
  optional<at::Generator> generator;  // else draw from this or the default generator
  const Tensor* pair = nullptr;       // backward: the pair the forward used
};

void check_rng(const RngSource& rng, const Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(rng.seed.has_value() == rng.offset.has_value(), "fused_dropout.", op,
                    ": seed and offset must be given together");
  if (rng.offset) {
    TORCH_CHECK_VALUE(*rng.offset >= 0 && *rng.offset % 4 == 0, "fused_dropout.", op,
                      ": offset must be a non-negative multiple of 4, got ", *rng.offset);
  }
  if (rng.pair) {
    const Tensor& pair = *rng.pair;
    TORCH_CHECK(pair.scalar_type() == at::kLong && pair.numel() == 2 && pair.is_contiguous() &&
                    pair.device() == input.device(),
                "fused_dropout.", op, ": seed_offset must be an int64 tensor of 2 elements on ",
                input.device(), ", got ", pair.scalar_type(), " ", pair.sizes(), " on ",
                pair.device());
  }
}

std::pair<uint64_t, uint64_t> cpu_pair(const RngSource& rng, bool draw) {
  if (rng.pair) {
    const int64_t* v = rng.pair->const_data_ptr<int64_t>();
    return {static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
  }
  if (rng.seed) return {static_cast<uint64_t>(*rng.seed), static_cast<uint64_t>(*rng.offset)};
  if (!draw) return {0, 0};
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      rng.generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return {gen->random64(), 0};
}

// ---------------------------------------------------------------- layout

bool same_strides(const Tensor& a, const optional<Tensor>& b) {
  return !b || b->strides() == a.strides();
}

// The map for the contiguous layout: runs of `inner` elements share a mask element.
MaskMap contiguous_map(const Tensor& input, int64_t k) {
  MaskMap map;
  map.mask_numel = c10::multiply_integers(input.sizes().slice(0, k));
  map.run = map.mask_numel == 0 ? 1 : input.numel() / map.mask_numel;
  return map;
}

// The kernel walks memory in order; choose a MaskMap for which the operands'
// own layout is valid, or report that they must be made contiguous first.
optional<MaskMap> direct_map(const Tensor& input, const optional<Tensor>& residual, bool has_bias,
                             int64_t k) {
  if (!same_strides(input, residual)) return std::nullopt;
  MaskMap map = contiguous_map(input, k);
  if (input.is_contiguous()) return map;
  const int64_t inner = map.run;
  if (has_bias || inner == 1 || k > 2) return std::nullopt;
  const auto format = input.dim() == 4   ? at::MemoryFormat::ChannelsLast
                      : input.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                         : at::MemoryFormat::Contiguous;
  if (format == at::MemoryFormat::Contiguous || !input.is_contiguous(format)) return std::nullopt;
  // Channels-last: each sample is one block; inside it the channel varies fastest.
  map.run = inner * (k == 2 ? input.size(1) : 1);
  if (k == 2) map.stride = map.period = input.size(1);
  return map;
}

void launch(const MaskedOpArgs& args, const Tensor& input, const RngSource& rng, bool draw,
            Tensor& pair) {
  if (input.is_cpu()) {
    const auto [seed, offset] = cpu_pair(rng, draw);
    masked_op_cpu(args, seed, offset);
    if (!rng.pair) {
      pair = at::empty({2}, input.options().dtype(at::kLong));
      pair.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
      pair.data_ptr<int64_t>()[1] = static_cast<int64_t>(offset);
    }
    return;
  }
#ifdef FUSED_DROPOUT_WITH_CUDA
  c10::cuda::CUDAGuard guard(input.device());
  at::PhiloxCudaState philox(0, 0);
  if (rng.seed) {
    philox =
        at::PhiloxCudaState(static_cast<uint64_t>(*rng.seed), static_cast<uint64_t>(*rng.offset));
  } else if (draw && !rng.pair) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        rng.generator, at::cuda::detail::getDefaultCUDAGenerator(input.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  const int64_t* pair_in = rng.pair ? rng.pair->const_data_ptr<int64_t>() : nullptr;
  // The kernel writes the pair it used; with nothing to launch it stays (0, 0).
  if (!rng.pair) {
    const auto options = input.options().dtype(at::kLong);
    pair = args.numel > 0 ? at::empty({2}, options) : at::zeros({2}, options);
  }
  C10_CUDA_CHECK(masked_op_cuda(args, philox, pair_in,
                                rng.pair ? nullptr : pair.mutable_data_ptr<int64_t>(),
                                c10::cuda::getCurrentCUDAStream(input.device().index()).stream()));
#endif
}

// Runs one masked op into `out` (which may be `input`) and returns the
// (seed, offset) pair used as an int64[2] tensor on the input's device.
// The mask covers the leading k dims (mask_dims()).
Tensor run_masked(const Tensor& input, const optional<Tensor>& residual,
                  const optional<Tensor>& bias, Tensor& out, int64_t k, const MaskedAffine& affine,
                  const RngSource& rng) {
  const bool draw = !affine.keep_all && input.numel() > 0;
  const optional<MaskMap> direct = direct_map(input, residual, bias.has_value(), k);

  MaskedOpArgs args;
  args.dtype = kernel_dtype(input, "dropout");  // checked by check_op
  args.numel = input.numel();
  args.affine = affine;
  Tensor x = input, r = residual.value_or(Tensor()), o = out, b;
  if (direct) {
    args.map = *direct;
  } else {
    x = input.contiguous();
    if (residual) r = residual->contiguous();
    o = at::empty(input.sizes(), input.options());
    args.map = contiguous_map(x, k);
  }
  if (bias) {
    b = bias->contiguous();
    args.bias = b.const_data_ptr();
    args.bias_len = b.numel();
  }
  args.input = x.const_data_ptr();
  args.residual = r.defined() ? r.const_data_ptr() : nullptr;
  args.out = o.mutable_data_ptr();

  Tensor pair = rng.pair ? *rng.pair : Tensor();
  launch(args, input, rng, draw, pair);
  if (!direct) out.copy_(o);
  return pair;
}

// ---------------------------------------------------------------- kernels

// The checks every op runs before anything is written; returns the mask's k.
int64_t check_op(const Tensor& input, double p, int64_t mask_ndim, const RngSource& rng,
                 const char* op) {
  check_p(p);
  kernel_dtype(input, op);
  check_device(input, op);
  check_rng(rng, input, op);
  return mask_dims(input, mask_ndim, op);
}

std::tuple<Tensor, Tensor> dropout_impl(const Tensor& input, double p, int64_t mask_ndim,
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

Tensor dropout_inplace_impl(Tensor& input, double p, int64_t mask_ndim, bool scale_by_keep,
                            bool alpha, optional<int64_t> seed, optional<int64_t> offset,
                            optional<at::Generator> generator) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout_");
  at::assert_no_internal_overlap(input);
  return run_masked(input, std::nullopt, std::nullopt, input, k,
                    make_affine(p, scale_by_keep, alpha, /*backward=*/false), rng);
}

Tensor dropout_backward_impl(const Tensor& grad, const Tensor& seed_offset, double p,
                             int64_t mask_ndim, bool scale_by_keep, bool alpha) {
  RngSource rng;
  rng.pair = &seed_offset;
  const int64_t k = check_op(grad, p, mask_ndim, rng, "dropout_backward");
  Tensor out = at::empty_like(grad);
  run_masked(grad, std::nullopt, std::nullopt, out, k,
             make_affine(p, scale_by_keep, alpha, /*backward=*/true), rng);
  return out;
}

std::tuple<Tensor, Tensor> dropout_add_impl(const Tensor& input, const Tensor& residual,
                                            const optional<Tensor>& bias, double p,
                                            int64_t mask_ndim, bool scale_by_keep,
                                            optional<int64_t> seed, optional<int64_t> offset,
                                            optional<at::Generator> generator) {
  const RngSource rng{seed, offset, generator};
  const int64_t k = check_op(input, p, mask_ndim, rng, "dropout_add");
  check_same(input, residual, "residual", "dropout_add");
  if (bias) {
    TORCH_CHECK(input.dim() >= 1,
                "fused_dropout.dropout_add: a bias needs an input with at "
                "least one dimension");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == input.size(-1),
                "fused_dropout.dropout_add: bias must be 1-D with input.size(-1) = ",
                input.size(-1), " elements, got shape ", bias->sizes());
    TORCH_CHECK(bias->device() == input.device(), "fused_dropout.dropout_add: bias is on ",
                bias->device(), " but input is on ", input.device());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(),
                     "fused_dropout.dropout_add: bias has dtype ", bias->scalar_type(),
                     " but input has dtype ", input.scalar_type());
  }
  Tensor out = at::empty_like(input);
  Tensor pair = run_masked(input, residual, bias, out, k,
                           make_affine(p, scale_by_keep, /*alpha=*/false, /*backward=*/false), rng);
  return {out, pair};
}

// ---------------------------------------------------------------- autograd

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor call_dropout_backward(const Tensor& grad, const Tensor& pair, double p, int64_t mask_ndim,
                             bool scale_by_keep, bool alpha) {
  static auto op = op_handle<decltype(dropout_backward_impl)>("fused_dropout::dropout_backward");
  return op.call(grad, pair, p, mask_ndim, scale_by_keep, alpha);
}

// The attributes every backward needs besides the pair.
void save_mask_params(AutogradContext* ctx, const Tensor& pair, double p, int64_t mask_ndim,
                      bool scale_by_keep, bool alpha) {
  ctx->save_for_backward({pair});
  ctx->saved_data["p"] = p;
  ctx->saved_data["mask_ndim"] = mask_ndim;
  ctx->saved_data["scale_by_keep"] = scale_by_keep;
  ctx->saved_data["alpha"] = alpha;
}

// dropout_backward of `grad` with the saved pair and parameters.
Tensor regenerate(AutogradContext* ctx, const Tensor& grad) {
  if (!grad.defined()) return grad;
  // Without create_graph there is no graph to record: skip the autograd kernel.
  std::optional<at::AutoDispatchBelowADInplaceOrView> no_graph;
  if (!at::GradMode::is_enabled()) no_graph.emplace();
  return call_dropout_backward(grad, ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble(),
                               ctx->saved_data["mask_ndim"].toInt(),
                               ctx->saved_data["scale_by_keep"].toBool(),
                               ctx->saved_data["alpha"].toBool());
}

struct DropoutFunction : torch::autograd::Function<DropoutFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, double p,
                               int64_t mask_ndim, bool scale_by_keep, bool alpha,
                               optional<int64_t> seed, optional<int64_t> offset,
                               optional<at::Generator> generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(dropout_impl)>("fused_dropout::dropout");
    auto [out, pair] = op.call(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator);
    save_mask_params(ctx, pair, p, mask_ndim, scale_by_keep, alpha);
    ctx->mark_non_differentiable({pair});
    return {out, pair};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {regenerate(ctx, grads[0]),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

// Returns only the modified input (autograd allows a single output when the
// input is a view); the pair goes out through `pair_out`.
struct DropoutInplaceFunction : torch::autograd::Function<DropoutInplaceFunction> {
  static variable_list forward(AutogradContext* ctx, Tensor input, double p, int64_t mask_ndim,
                               bool scale_by_keep, bool alpha, optional<int64_t> seed,
                               optional<int64_t> offset, optional<at::Generator> generator,
                               Tensor* pair_out) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = op_handle<decltype(dropout_inplace_impl)>("fused_dropout::dropout_");
      *pair_out = op.call(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator);
    }
    torch::autograd::impl::bump_version(input);
    ctx->mark_dirty({input});
    save_mask_params(ctx, *pair_out, p, mask_ndim, scale_by_keep, alpha);
    return {input};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {regenerate(ctx, grads[0]),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

// The backward is linear in the gradient, so its own backward is itself.
struct DropoutBackwardFunction : torch::autograd::Function<DropoutBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& pair,
                               double p, int64_t mask_ndim, bool scale_by_keep, bool alpha) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_mask_params(ctx, pair, p, mask_ndim, scale_by_keep, alpha);
    return {call_dropout_backward(grad, pair, p, mask_ndim, scale_by_keep, alpha)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {regenerate(ctx, grads[0]), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct DropoutAddFunction : torch::autograd::Function<DropoutAddFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& residual,
                               const optional<Tensor>& bias, double p, int64_t mask_ndim,
                               bool scale_by_keep, optional<int64_t> seed, optional<int64_t> offset,
                               optional<at::Generator> generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(dropout_add_impl)>("fused_dropout::dropout_add");
    auto [out, pair] =
        op.call(input, residual, bias, p, mask_ndim, scale_by_keep, seed, offset, generator);
    save_mask_params(ctx, pair, p, mask_ndim, scale_by_keep, /*alpha=*/false);
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({pair});
    return {out, pair};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad = grads[0];
    Tensor grad_input = regenerate(ctx, grad);
    Tensor grad_bias;
    if (ctx->saved_data["has_bias"].toBool() && grad_input.defined()) {
      grad_bias = grad_input.reshape({-1, grad_input.size(-1)}).sum(0);
    }
    // The residual's gradient is the incoming gradient itself: no copy.
    return {grad_input, grad,     grad_bias, Tensor(), Tensor(),
            Tensor(),   Tensor(), Tensor(),  Tensor()};
  }
};

std::tuple<Tensor, Tensor> dropout_autograd(const Tensor& input, double p, int64_t mask_ndim,
                                            bool scale_by_keep, bool alpha, optional<int64_t> seed,
                                            optional<int64_t> offset,
                                            optional<at::Generator> generator) {
  auto out =
      DropoutFunction::apply(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator);
  return {out[0], out[1]};
}

Tensor dropout_inplace_autograd(Tensor& input, double p, int64_t mask_ndim, bool scale_by_keep,
                                bool alpha, optional<int64_t> seed, optional<int64_t> offset,
                                optional<at::Generator> generator) {
  // torch's in-place checks, before anything is written.
  if (input.requires_grad() && at::GradMode::is_enabled()) {
    TORCH_CHECK(!(input.is_view() && input._base().is_leaf()),
                "a view of a leaf Variable that requires grad is being used in an in-place "
                "operation.");
    TORCH_CHECK(!input.is_leaf(),
                "a leaf Variable that requires grad is being used in an in-place operation.");
  }
  Tensor pair;
  DropoutInplaceFunction::apply(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator,
                                &pair);
  return pair;
}

Tensor dropout_backward_autograd(const Tensor& grad, const Tensor& seed_offset, double p,
                                 int64_t mask_ndim, bool scale_by_keep, bool alpha) {
  return DropoutBackwardFunction::apply(grad, seed_offset, p, mask_ndim, scale_by_keep, alpha)[0];
}

std::tuple<Tensor, Tensor> dropout_add_autograd(const Tensor& input, const Tensor& residual,
                                                const optional<Tensor>& bias, double p,
                                                int64_t mask_ndim, bool scale_by_keep,
                                                optional<int64_t> seed, optional<int64_t> offset,
                                                optional<at::Generator> generator) {
  auto out = DropoutAddFunction::apply(input, residual, bias, p, mask_ndim, scale_by_keep, seed,
                                       offset, generator);
  return {out[0], out[1]};
}

}  // namespace

// ---------------------------------------------------------------- schemas

TORCH_LIBRARY(fused_dropout, m) {
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def(
      "dropout(Tensor input, float p, int mask_ndim, bool scale_by_keep, bool alpha, int? seed, "
      "int? offset, Generator? generator) -> (Tensor, Tensor)",
      seeded);
  m.def(
      "dropout_(Tensor(a!) input, float p, int mask_ndim, bool scale_by_keep, bool alpha, "
      "int? seed, int? offset, Generator? generator) -> Tensor",
      seeded);
  m.def(
      "dropout_backward(Tensor grad, Tensor seed_offset, float p, int mask_ndim, "
      "bool scale_by_keep, bool alpha) -> Tensor");
  m.def(
      "dropout_add(Tensor input, Tensor residual, Tensor? bias, float p, int mask_ndim, "
      "bool scale_by_keep, int? seed, int? offset, Generator? generator) -> (Tensor, Tensor)",
      seeded);
}

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout", dropout_impl);
  m.impl("dropout_", dropout_inplace_impl);
  m.impl("dropout_backward", dropout_backward_impl);
  m.impl("dropout_add", dropout_add_impl);
}

// Registered with or without CUDA kernels, so a CPU-only build gives a clear error.
TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) {
  m.impl("dropout", dropout_impl);
  m.impl("dropout_", dropout_inplace_impl);
  m.impl("dropout_backward", dropout_backward_impl);
  m.impl("dropout_add", dropout_add_impl);
}

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout", dropout_autograd);
  m.impl("dropout_", dropout_inplace_autograd);
  m.impl("dropout_backward", dropout_backward_autograd);
  m.impl("dropout_add", dropout_add_autograd);
}

}  // namespace fused_dropout
