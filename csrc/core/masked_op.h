// The per-element arithmetic of every op in the library, host+device.
//
// One formula covers dropout, its backward, alpha dropout, the channel-wise
// and per-sample (DropPath) variants and the fused residual adds:
//
//   v   = x (+ bias[col])                           compute type
//   y   = keep(m) ? v * scale (+ shift) : drop       compute type
//   out = y (+ residual)                             one rounding to the dtype
//
// where m is the element's mask index (see MaskMap) and keep(m) is the
// contract's decision (core/keep.h). Every add and multiply
// is rounded separately (no FMA contraction) so the CPU and every GPU agree
// to the bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/keep.h"

namespace fused_dropout {

enum class DType : int { kFloat, kDouble, kHalf, kBFloat16 };

// Maps a (kernel-order) element index e to its mask index:
//   m = (e / run) * stride + e % period
// element-wise masks:       run = 1,         stride = 1, period = 1  (m = e)
// leading dims, contiguous: run = inner,     stride = 1, period = 1
// (N, C) mask, channels-last layout: run = C * spatial, stride = C, period = C
//
// A box (the local tensor is a slice of a larger logical one: a shard, or a data-parallel
// rank's rows; ops/checks.cpp's check_box) then maps that local mask index q to the global
// one, the row-major position in the logical mask:
//   m = base + (q / seg) * seg_stride + q % seg
// runs of seg consecutive local indices are consecutive global ones (base: any value, not
// only a multiple of 8). Without a box (boxed false) m = q.
struct MaskMap {
  int64_t run = 1;
  int64_t stride = 1;
  int64_t period = 1;
  int64_t mask_numel = 0;
  bool boxed = false;
  int64_t base = 0;
  int64_t seg = 1;
  int64_t seg_stride = 1;
  bool elementwise() const { return run == 1 && period == 1; }
};

// Constants of the affine map applied to kept and dropped elements.
struct MaskedAffine {
  double scale = 1.0;
  double shift = 0.0;  // used only when has_shift (alpha dropout's forward)
  double drop = 0.0;   // the value of a dropped element before the residual
  bool has_shift = false;
  bool keep_all = false;  // p == 0: nothing is drawn, every element is kept
  uint32_t threshold = 0;
};

// One call of a masked op, as raw pointers: what ops.cpp hands to the CPU loop
// or the CUDA launcher. All tensors share one layout (kernel order), and
// residual, bias and input may be null / absent as the op needs.
struct MaskedOpArgs {
  DType dtype = DType::kFloat;
  const void* input = nullptr;
  const void* residual = nullptr;  // added after masking, or null
  const void* bias = nullptr;      // bias[e % bias_len] added before masking, or null
  void* out = nullptr;             // may alias input (in-place)
  int64_t numel = 0;
  int64_t bias_len = 0;
  MaskMap map;
  MaskedAffine affine;
};

// torch's alpha_dropout constant: -SELU(-inf) = selu_scale * selu_alpha.
constexpr double kAlphaDropoutAlpha = 1.7580993408473766;

// The map of dropout (backward: of its gradient) for the given parameters.
inline MaskedAffine make_affine(double p, bool scale_by_keep, bool alpha, bool backward) {
  MaskedAffine a;
  a.keep_all = p == 0.0;
  a.threshold = keep_threshold(p);
  const double keep = 1.0 - p;
  if (keep <= 0.0) return a;  // p == 1: every element becomes exactly 0
  if (alpha) {
    const double A = kAlphaDropoutAlpha;
    const double factor = 1.0 / std::sqrt((A * A * p + 1.0) * keep);
    a.scale = factor;
    if (!backward && p > 0.0) {  // at p == 0 a shift of +0 would turn -0 into +0: identity
      a.has_shift = true;
      a.shift = A * factor * p;
      a.drop = A * factor * (p - 1.0);
    }
  } else if (scale_by_keep) {
    a.scale = 1.0 / keep;
  }
  return a;
}

// Separately rounded add and multiply: never contracted into an FMA.
FD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FD_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FD_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FD_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// MaskedAffine's constants rounded to the compute type (float or double).
// (has_shift is a template parameter of the loops: a runtime flag keeps GCC from
// vectorizing the common, shift-free loop.)
template <typename acc_t>
struct AffineConsts {
  acc_t scale, shift, drop;
  static AffineConsts make(const MaskedAffine& a) {
    return {static_cast<acc_t>(a.scale), static_cast<acc_t>(a.shift), static_cast<acc_t>(a.drop)};
  }
};

// bfloat16 <-> float, as bit patterns: round to nearest even, NaN -> 0x7FC0
// (what c10::BFloat16 does), written once so the CPU loop vectorizes it and the
// GPU rounds identically.
FD_HD float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

FD_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(f);
#else
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
#endif
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

#if !defined(__CUDACC__)
// float16 <-> float, as bit patterns, for the CPU loops (CUDA has its own): c10's portable
// conversion (round to nearest even; a NaN becomes 0x7E00 with its sign), which GCC
// vectorizes for every ISA, so that every CPU path gives the same bits.
FD_HD float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers, Inf and NaN: the exponent rebiased by 0xE0, then scaled by 2^-112.
  const float normalized = __builtin_bit_cast(float, (two_w >> 4) + (0xE0u << 23)) *
                           __builtin_bit_cast(float, 15u << 23);
  // Zero and subnormals: the mantissa under the exponent of 0.5, minus 0.5.
  const float denormalized = __builtin_bit_cast(float, (two_w >> 17) | (126u << 23)) - 0.5f;
  return __builtin_bit_cast(float,
                            sign | (two_w < (1u << 27) ? __builtin_bit_cast(uint32_t, denormalized)
                                                       : __builtin_bit_cast(uint32_t, normalized)));
}

FD_HD uint16_t float_to_half_bits(float f) {
  // Scaling up then down rounds the mantissa to 10 bits (nearest even) and saturates to Inf.
  float base = (__builtin_fabsf(f) * __builtin_bit_cast(float, 239u << 23)) *
               __builtin_bit_cast(float, 17u << 23);
  const uint32_t w = __builtin_bit_cast(uint32_t, f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = __builtin_bit_cast(float, (bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = __builtin_bit_cast(uint32_t, base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
#endif

// y for one element, before the residual. Dropped elements are selected, not
// multiplied, so a NaN or Inf in them never leaks.
// keep ? a : b. On the CPU as bit operations: GCC then vectorizes the loop for
// every target (it will not if-convert the ternary for AVX2).
FD_HD float select(bool keep, float a, float b) {
#if defined(__CUDA_ARCH__)
  return keep ? a : b;
#else
  const uint32_t m = 0u - static_cast<uint32_t>(keep);
  return __builtin_bit_cast(
      float, (__builtin_bit_cast(uint32_t, a) & m) | (__builtin_bit_cast(uint32_t, b) & ~m));
#endif
}
FD_HD double select(bool keep, double a, double b) {
#if defined(__CUDA_ARCH__)
  return keep ? a : b;
#else
  const uint64_t m = uint64_t(0) - static_cast<uint64_t>(keep);
  return __builtin_bit_cast(
      double, (__builtin_bit_cast(uint64_t, a) & m) | (__builtin_bit_cast(uint64_t, b) & ~m));
#endif
}

template <bool kShift, typename acc_t>
FD_HD acc_t masked_value(bool keep, acc_t v, const AffineConsts<acc_t>& c) {
  acc_t kept = mul_rn(v, c.scale);
  if constexpr (kShift) kept = add_rn(kept, c.shift);
  return select(keep, kept, c.drop);
}

}  // namespace fused_dropout
