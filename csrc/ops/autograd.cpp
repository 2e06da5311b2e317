// C++ autograd of the ops: forward saves only the (seed, offset) pair and the mask's
// parameters; backward regenerates the mask through dropout_backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops/kernels.h"

namespace fused_dropout {
namespace {

using at::Tensor;
using std::optional;

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor call_dropout_backward(const Tensor& grad, const Tensor& pair, double p, int64_t mask_ndim,
                             bool scale_by_keep, bool alpha) {
  static auto op = op_handle<decltype(dropout_backward_kernel)>("fused_dropout::dropout_backward");
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
  // Unpacked before the guard below: unpacking may rerun forward code (non-reentrant
  // activation checkpointing recomputes there), which must record its autograd graph.
  const Tensor pair = ctx->get_saved_variables()[0];
  // Without create_graph there is no graph to record: skip the autograd kernel.
  std::optional<at::AutoDispatchBelowADInplaceOrView> no_graph;
  if (!at::GradMode::is_enabled()) no_graph.emplace();
  return call_dropout_backward(
      grad, pair, ctx->saved_data["p"].toDouble(), ctx->saved_data["mask_ndim"].toInt(),
      ctx->saved_data["scale_by_keep"].toBool(), ctx->saved_data["alpha"].toBool());
}

// The gradients of a forward with `inputs` arguments: the given ones first, then undefined
// ones for the non-tensor arguments (p, mask_ndim, the RNG arguments, ...).
variable_list grads_then_undefined(variable_list grads, size_t inputs) {
  grads.resize(inputs);
  return grads;
}

struct DropoutFunction : torch::autograd::Function<DropoutFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, double p,
                               int64_t mask_ndim, bool scale_by_keep, bool alpha,
                               optional<int64_t> seed, optional<int64_t> offset,
                               optional<at::Generator> generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(dropout_kernel)>("fused_dropout::dropout");
    auto [out, pair] = op.call(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator);
    save_mask_params(ctx, pair, p, mask_ndim, scale_by_keep, alpha);
    ctx->mark_non_differentiable({pair});
    return {out, pair};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return grads_then_undefined({regenerate(ctx, grads[0])}, 8);
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
      static auto op = op_handle<decltype(dropout_inplace_kernel)>("fused_dropout::dropout_");
      *pair_out = op.call(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator);
    }
    torch::autograd::impl::bump_version(input);
    ctx->mark_dirty({input});
    save_mask_params(ctx, *pair_out, p, mask_ndim, scale_by_keep, alpha);
    return {input};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return grads_then_undefined({regenerate(ctx, grads[0])}, 9);
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
    return grads_then_undefined({regenerate(ctx, grads[0])}, 6);
  }
};

struct DropoutAddFunction : torch::autograd::Function<DropoutAddFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& residual,
                               const optional<Tensor>& bias, double p, int64_t mask_ndim,
                               bool scale_by_keep, optional<int64_t> seed, optional<int64_t> offset,
                               optional<at::Generator> generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(dropout_add_kernel)>("fused_dropout::dropout_add");
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
      // Over every dim but the last; flatten, not reshape({-1, n}), which fails for n == 0.
      grad_bias = grad_input.dim() == 1 ? grad_input.clone() : grad_input.flatten(0, -2).sum(0);
    }
    // The residual's gradient is the incoming gradient itself: no copy.
    return grads_then_undefined({grad_input, grad, grad_bias}, 9);
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

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout", dropout_autograd);
  m.impl("dropout_", dropout_inplace_autograd);
  m.impl("dropout_backward", dropout_backward_autograd);
  m.impl("dropout_add", dropout_add_autograd);
}

}  // namespace fused_dropout
