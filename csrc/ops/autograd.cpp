// C++ autograd of the ops: forward saves only the (seed, offset) pair and the mask's
// parameters; backward regenerates the mask through dropout_backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

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
                             bool scale_by_keep, bool alpha, at::OptionalIntArrayRef global_shape,
                             at::OptionalIntArrayRef global_offset) {
  static auto op = op_handle<decltype(dropout_backward_kernel)>("fused_dropout::dropout_backward");
  return op.call(grad, pair, p, mask_ndim, scale_by_keep, alpha, global_shape, global_offset);
}

c10::IValue box_value(at::OptionalIntArrayRef v) {
  return v ? c10::IValue(v->vec()) : c10::IValue();
}

// The attributes every backward needs besides the pair (the box: the mask's global indexing).
void save_mask_params(AutogradContext* ctx, const Tensor& pair, double p, int64_t mask_ndim,
                      bool scale_by_keep, bool alpha, at::OptionalIntArrayRef global_shape,
                      at::OptionalIntArrayRef global_offset) {
  ctx->save_for_backward({pair});
  ctx->saved_data["p"] = p;
  ctx->saved_data["mask_ndim"] = mask_ndim;
  ctx->saved_data["scale_by_keep"] = scale_by_keep;
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["global_shape"] = box_value(global_shape);
  ctx->saved_data["global_offset"] = box_value(global_offset);
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
  const std::vector<int64_t> shape = ctx->saved_data["global_shape"].isNone()
                                         ? std::vector<int64_t>()
                                         : ctx->saved_data["global_shape"].toIntList().vec();
  const std::vector<int64_t> start = ctx->saved_data["global_offset"].isNone()
                                         ? std::vector<int64_t>()
                                         : ctx->saved_data["global_offset"].toIntList().vec();
  const bool boxed = !ctx->saved_data["global_shape"].isNone();
  return call_dropout_backward(
      grad, pair, ctx->saved_data["p"].toDouble(), ctx->saved_data["mask_ndim"].toInt(),
      ctx->saved_data["scale_by_keep"].toBool(), ctx->saved_data["alpha"].toBool(),
      boxed ? at::OptionalIntArrayRef(shape) : std::nullopt,
      boxed ? at::OptionalIntArrayRef(start) : std::nullopt);
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
                               optional<at::Generator> generator,
                               at::OptionalIntArrayRef global_shape,
                               at::OptionalIntArrayRef global_offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(dropout_kernel)>("fused_dropout::dropout");
    auto [out, pair] = op.call(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator,
                               global_shape, global_offset);
    save_mask_params(ctx, pair, p, mask_ndim, scale_by_keep, alpha, global_shape, global_offset);
    ctx->mark_non_differentiable({pair});
    return {out, pair};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return grads_then_undefined({regenerate(ctx, grads[0])}, 10);
  }
};

// Returns only the modified input (autograd allows a single output when the
// input is a view); the pair goes out through `pair_out`.
struct DropoutInplaceFunction : torch::autograd::Function<DropoutInplaceFunction> {
  static variable_list forward(AutogradContext* ctx, Tensor input, double p, int64_t mask_ndim,
                               bool scale_by_keep, bool alpha, optional<int64_t> seed,
                               optional<int64_t> offset, optional<at::Generator> generator,
                               at::OptionalIntArrayRef global_shape,
                               at::OptionalIntArrayRef global_offset, Tensor* pair_out) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = op_handle<decltype(dropout_inplace_kernel)>("fused_dropout::dropout_");
      *pair_out = op.call(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator,
                          global_shape, global_offset);
    }
    torch::autograd::impl::bump_version(input);
    ctx->mark_dirty({input});
    save_mask_params(ctx, *pair_out, p, mask_ndim, scale_by_keep, alpha, global_shape,
                     global_offset);
    return {input};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return grads_then_undefined({regenerate(ctx, grads[0])}, 11);
  }
};

// The backward is linear in the gradient, so its own backward is itself.
struct DropoutBackwardFunction : torch::autograd::Function<DropoutBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& pair,
                               double p, int64_t mask_ndim, bool scale_by_keep, bool alpha,
                               at::OptionalIntArrayRef global_shape,
                               at::OptionalIntArrayRef global_offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_mask_params(ctx, pair, p, mask_ndim, scale_by_keep, alpha, global_shape, global_offset);
    return {call_dropout_backward(grad, pair, p, mask_ndim, scale_by_keep, alpha, global_shape,
                                  global_offset)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return grads_then_undefined({regenerate(ctx, grads[0])}, 8);
  }
};

struct DropoutAddFunction : torch::autograd::Function<DropoutAddFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& residual,
                               const optional<Tensor>& bias, double p, int64_t mask_ndim,
                               bool scale_by_keep, optional<int64_t> seed, optional<int64_t> offset,
                               optional<at::Generator> generator,
                               at::OptionalIntArrayRef global_shape,
                               at::OptionalIntArrayRef global_offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(dropout_add_kernel)>("fused_dropout::dropout_add");
    auto [out, pair] = op.call(input, residual, bias, p, mask_ndim, scale_by_keep, seed, offset,
                               generator, global_shape, global_offset);
    save_mask_params(ctx, pair, p, mask_ndim, scale_by_keep, /*alpha=*/false, global_shape,
                     global_offset);
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({pair});
    return {out, pair};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad = grads[0];
    Tensor grad_input = regenerate(ctx, grad);
    Tensor grad_bias;
    if (ctx->saved_data["has_bias"].toBool() && grad_input.defined()) {
      // Over every dim but the last, as one reduction over those dims (not flatten(0, -2) then
      // sum(0): a DTensor cannot flatten an unevenly sharded dim; a contiguous gradient
      // coalesces the dims into the same single reduction).
      std::vector<int64_t> dims(grad_input.dim() - 1);
      std::iota(dims.begin(), dims.end(), 0);
      grad_bias = grad_input.dim() == 1 ? grad_input.clone() : grad_input.sum(dims);
    }
    // The residual's gradient is the incoming gradient itself: no copy.
    return grads_then_undefined({grad_input, grad, grad_bias}, 11);
  }
};

// The fused dropout + add + norm. Saves h (memory_efficient: y, which the next layer keeps
// anyway, with the bias), the rows' mean and rstd, the weight and the pair; no mask. Backward
// gives every input's gradient in one pass (and the column sums).
struct DropoutAddNormFunction : torch::autograd::Function<DropoutAddNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& residual, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& input_bias,
                               double p, double eps, bool rms, bool per_sample,
                               bool residual_in_fp32, bool keep_h, bool memory_efficient,
                               optional<int64_t> seed, optional<int64_t> offset,
                               optional<at::Generator> generator) {
    const auto wants = [](const optional<Tensor>& t) { return t && t->requires_grad(); };
    const bool any_grad = input.requires_grad() || wants(residual) || wants(weight) ||
                          wants(bias) || wants(input_bias);
    Tensor y, h, mean, rstd, pair;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op =
          op_handle<decltype(dropout_add_norm_kernel)>("fused_dropout::dropout_add_norm");
      std::tie(y, h, mean, rstd, pair) = op.call(
          input, residual, weight, bias, input_bias, p, eps, rms, per_sample, residual_in_fp32,
          keep_h || (any_grad && !memory_efficient), memory_efficient, seed, offset, generator);
    }
    // y is one of this node's outputs: autograd keeps it without a reference cycle, and an
    // in-place change of it before backward raises.
    ctx->save_for_backward({memory_efficient ? y : h, weight.value_or(Tensor()),
                            memory_efficient ? bias.value_or(Tensor()) : Tensor(), mean, rstd,
                            pair});
    ctx->saved_data["memory_efficient"] = memory_efficient;
    ctx->saved_data["residual_in_fp32"] = residual_in_fp32;
    ctx->saved_data["p"] = p;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["per_sample"] = per_sample;
    ctx->saved_data["grad_residual"] = wants(residual);
    ctx->saved_data["grad_weight"] = wants(weight);
    ctx->saved_data["grad_bias"] = wants(bias);
    ctx->saved_data["grad_input_bias"] = wants(input_bias);
    // The dtypes the gradients are returned in.
    const auto dtype_of = [](const optional<Tensor>& t) {
      return static_cast<int64_t>(t ? t->scalar_type() : at::ScalarType::Undefined);
    };
    ctx->saved_data["residual_dtype"] = dtype_of(residual);
    ctx->saved_data["weight_dtype"] = dtype_of(weight);
    ctx->saved_data["bias_dtype"] = dtype_of(bias);
    ctx->mark_non_differentiable({mean, rstd, pair});
    // h goes out only if asked for (the op's contract); it was written for backward anyway.
    return {y, keep_h ? h : at::empty({0}, h.options()), mean, rstd, pair};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused_dropout.dropout_add_norm: double backward (create_graph=True) is not "
                "supported");
    const Tensor &h_or_y = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3],
                 &rstd = saved[4], &pair = saved[5];
    // (Undefined gradients come materialized as zeros.) An h that went out (prenorm) brings
    // its own gradient.
    const optional<Tensor> grad_h = grads[1].defined() && grads[1].sizes() == grads[0].sizes()
                                        ? optional<Tensor>(grads[1])
                                        : std::nullopt;
    const auto flag = [&](const char* name) { return ctx->saved_data[name].toBool(); };
    static auto op = op_handle<decltype(dropout_add_norm_backward_kernel)>(
        "fused_dropout::dropout_add_norm_backward");
    const auto defined = [](const Tensor& t) {
      return t.defined() ? optional<Tensor>(t) : std::nullopt;
    };
    auto [grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias] =
        op.call(grads[0], grad_h, h_or_y, flag("memory_efficient"), defined(weight), defined(bias),
                mean, rstd, pair, ctx->saved_data["p"].toDouble(), flag("rms"), flag("per_sample"),
                flag("residual_in_fp32"), flag("grad_residual"), flag("grad_weight"),
                flag("grad_bias"), flag("grad_input_bias"));
    // Returned in each input's dtype (the column sums come in the compute type).
    const auto as = [&](Tensor t, const char* dtype, bool wanted) {
      if (!wanted) return Tensor();
      const auto type = static_cast<at::ScalarType>(ctx->saved_data[dtype].toInt());
      return t.scalar_type() == type ? t : t.to(type);
    };
    return grads_then_undefined(
        {grad_input, as(grad_residual, "residual_dtype", flag("grad_residual")),
         as(grad_weight, "weight_dtype", flag("grad_weight")),
         as(grad_bias, "bias_dtype", flag("grad_bias")),
         flag("grad_input_bias") ? grad_input_bias.to(grad_input.scalar_type()) : Tensor()},
        15);
  }
};

std::tuple<Tensor, Tensor> dropout_autograd(const Tensor& input, double p, int64_t mask_ndim,
                                            bool scale_by_keep, bool alpha, optional<int64_t> seed,
                                            optional<int64_t> offset,
                                            optional<at::Generator> generator,
                                            at::OptionalIntArrayRef global_shape,
                                            at::OptionalIntArrayRef global_offset) {
  auto out = DropoutFunction::apply(input, p, mask_ndim, scale_by_keep, alpha, seed, offset,
                                    generator, global_shape, global_offset);
  return {out[0], out[1]};
}

Tensor dropout_inplace_autograd(Tensor& input, double p, int64_t mask_ndim, bool scale_by_keep,
                                bool alpha, optional<int64_t> seed, optional<int64_t> offset,
                                optional<at::Generator> generator,
                                at::OptionalIntArrayRef global_shape,
                                at::OptionalIntArrayRef global_offset) {
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
                                global_shape, global_offset, &pair);
  return pair;
}

Tensor dropout_backward_autograd(const Tensor& grad, const Tensor& seed_offset, double p,
                                 int64_t mask_ndim, bool scale_by_keep, bool alpha,
                                 at::OptionalIntArrayRef global_shape,
                                 at::OptionalIntArrayRef global_offset) {
  return DropoutBackwardFunction::apply(grad, seed_offset, p, mask_ndim, scale_by_keep, alpha,
                                        global_shape, global_offset)[0];
}

std::tuple<Tensor, Tensor> dropout_add_autograd(const Tensor& input, const Tensor& residual,
                                                const optional<Tensor>& bias, double p,
                                                int64_t mask_ndim, bool scale_by_keep,
                                                optional<int64_t> seed, optional<int64_t> offset,
                                                optional<at::Generator> generator,
                                                at::OptionalIntArrayRef global_shape,
                                                at::OptionalIntArrayRef global_offset) {
  auto out = DropoutAddFunction::apply(input, residual, bias, p, mask_ndim, scale_by_keep, seed,
                                       offset, generator, global_shape, global_offset);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dropout_add_norm_autograd(
    const Tensor& input, const optional<Tensor>& residual, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& input_bias, double p, double eps,
    bool rms, bool per_sample, bool residual_in_fp32, bool keep_h, bool memory_efficient,
    optional<int64_t> seed, optional<int64_t> offset, optional<at::Generator> generator) {
  auto out = DropoutAddNormFunction::apply(input, residual, weight, bias, input_bias, p, eps, rms,
                                           per_sample, residual_in_fp32, keep_h, memory_efficient,
                                           seed, offset, generator);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout", dropout_autograd);
  m.impl("dropout_", dropout_inplace_autograd);
  m.impl("dropout_backward", dropout_backward_autograd);
  m.impl("dropout_add", dropout_add_autograd);
  m.impl("dropout_add_norm", dropout_add_norm_autograd);
}

}  // namespace fused_dropout
