#include "ops/masked.h"

#include "cpu/dropout.h"
#include "ops/checks.h"

#ifdef FUSED_DROPOUT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/dropout.h"
#endif

namespace fused_dropout {
namespace {

using at::Tensor;
using std::optional;

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
  const at::PhiloxCudaState philox = cuda_philox_state(rng, draw, input.device().index());
  const int64_t* pair_in = rng.pair ? rng.pair->const_data_ptr<int64_t>() : nullptr;
  // The kernel writes the pair it used (also for an empty tensor).
  if (!rng.pair) pair = at::empty({2}, input.options().dtype(at::kLong));
  C10_CUDA_CHECK(masked_op_cuda(args, philox, pair_in,
                                rng.pair ? nullptr : pair.mutable_data_ptr<int64_t>(),
                                c10::cuda::getCurrentCUDAStream(input.device().index()).stream()));
#endif
}

}  // namespace

Tensor run_masked(const Tensor& input, const optional<Tensor>& residual,
                  const optional<Tensor>& bias, Tensor& out, int64_t k, const MaskedAffine& affine,
                  const RngSource& rng, const MaskBox& box) {
  const bool draw = !affine.keep_all && input.numel() > 0;
  const optional<MaskMap> direct = direct_map(input, residual, bias.has_value(), k);

  MaskedOpArgs args;
  args.dtype = kernel_dtype(input, "dropout");  // already checked by check_op
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
  args.map.boxed = box.boxed;
  args.map.base = box.base;
  args.map.seg = box.seg;
  args.map.seg_stride = box.seg_stride;
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

}  // namespace fused_dropout
