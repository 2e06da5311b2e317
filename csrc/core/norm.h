// The arithmetic of the fused dropout + residual add + norm, host+device: written once here
// and called by the CPU loops (cpu/norm.cpp) and the CUDA kernels (cuda/norm.cu).
//
//   h = residual + dropout(input + input_bias)      core/masked_op.h's masked_value, one rounding
//   y = norm(h) * weight + bias                      from h as stored, in the compute type
//
// The reduction contract. Every sum below has an order fixed by the shape alone, so the CPU
// (every SIMD path), every GPU, every launch geometry and thread count give the same bits.
//
// Row sums S(v) over the n elements of a row (v_i in the compute type):
//   - element i belongs to chunk c = i / 8 (kChunk), lane t = c % 32 (kLanes), stripe
//     s = c / 32 (kStripe = 256 elements) and group g = s % G, G = norm_groups(n);
//   - accumulator (g, t, j = i % 8) starts at +0 and adds its elements in increasing i, each
//     add rounded on its own;
//   - then a fixed tree: in each (g, t) the 8 accumulators pairwise (j + 4, then j + 2, then
//     j + 1: chunk_tree), then the 32 lanes pairwise (t + 16, t + 8, ..., t + 1), then the G
//     groups the same way (g + G/2, ..., g + 1).
//   On a GPU a warp owns a group (G warps a row), lane t the chunks t, t + 32, ...: the lane
//   tree is a butterfly of xor shuffles (a + b == b + a in IEEE, so every lane ends with the
//   value of the halving tree). On a CPU a stripe is 256 consecutive elements added into a
//   256-wide accumulator of its group: plain vector adds.
//
// Row statistics: LayerNorm mean = S(h) / n, var = S((h - mean)^2) / n (two passes);
// RMSNorm ms = S(h^2) / n; rstd = 1 / sqrt(var + eps) with an IEEE-rounded division and
// square root (never rsqrt, never fast math). Backward: c1 = S(g * xhat) / n and (LayerNorm)
// c2 = S(g) / n, with g = dy * weight.
//
// Column sums (dweight = sum of dy * xhat, dbias = sum of dy, dinput_bias = sum of the input's
// gradient as stored): the rows are cut into blocks of kRowBlock consecutive rows; a block's
// partial starts at +0 and adds its rows in order; the total starts at +0 and adds the
// partials in block order.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/masked_op.h"

namespace fused_dropout {

constexpr int kChunk = 8;                 // elements of a chunk: one lane's 16-byte vector(s)
constexpr int kLanes = 32;                // chunks of a stripe: the lanes of a warp
constexpr int kStripe = kChunk * kLanes;  // 256 elements
constexpr int kMaxGroups = 8;             // G: at most 8 warps per row
constexpr int kRowsPerGroupStep = 2048;   // G doubles per 2048 elements of a row
constexpr int64_t kRowBlock = 16;         // rows per partial of the column sums

// G = clamp(next_pow2(ceil(n / 2048)), 1, 8): fixed by the row length alone.
FD_HD int norm_groups(int64_t n) {
  int g = 1;
  while (g < kMaxGroups && int64_t(g) * kRowsPerGroupStep < n) g *= 2;
  return g;
}

// The group of stripe s, s % G: a mask, as G is a power of two (not a 64-bit division).
FD_HD int64_t stripe_group(int64_t s, int groups) { return s & (groups - 1); }

// Row blocks of the column sums for `rows` rows.
FD_HD int64_t row_blocks(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock; }

FD_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FD_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
FD_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FD_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
FD_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
FD_HD double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// The tree of one lane's 8 accumulators: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
template <typename acc_t>
FD_HD acc_t chunk_tree(const acc_t (&a)[kChunk]) {
  const acc_t b0 = add_rn(a[0], a[4]), b1 = add_rn(a[1], a[5]);
  const acc_t b2 = add_rn(a[2], a[6]), b3 = add_rn(a[3], a[7]);
  return add_rn(add_rn(b0, b2), add_rn(b1, b3));
}

// The halving tree of `count` (a power of two) values in place: v[k] += v[k + half] for
// half = count / 2, ..., 1; the result is v[0]. The lane tree and the group tree.
template <typename acc_t>
FD_HD acc_t halving_tree(acc_t* v, int count) {
  for (int half = count / 2; half > 0; half /= 2) {
    for (int k = 0; k < half; ++k) v[k] = add_rn(v[k], v[k + half]);
  }
  return v[0];
}

// Row statistics from the row sums (n elements).
template <typename acc_t>
FD_HD acc_t row_mean(acc_t sum, int64_t n) {
  return div_rn(sum, static_cast<acc_t>(n));
}
template <typename acc_t>
FD_HD acc_t row_rstd(acc_t sum_of_squares, int64_t n, acc_t eps) {
  return div_rn(acc_t(1), sqrt_rn(add_rn(div_rn(sum_of_squares, static_cast<acc_t>(n)), eps)));
}

// What one norm's per-element formulas need: the row's mean (0 for RMSNorm) and rstd.
template <typename acc_t>
struct RowStats {
  acc_t mean, rstd;
};

// xhat = (h - mean) * rstd (LayerNorm) or h * rstd (RMSNorm).
template <bool kRms, typename acc_t>
FD_HD acc_t normalized(acc_t h, const RowStats<acc_t>& s) {
  return kRms ? mul_rn(h, s.rstd) : mul_rn(sub_rn(h, s.mean), s.rstd);
}

// The deviation whose square LayerNorm's second pass sums (RMSNorm: h itself).
template <bool kRms, typename acc_t>
FD_HD acc_t deviation(acc_t h, acc_t mean) {
  return kRms ? h : sub_rn(h, mean);
}

// y = xhat * weight + bias (weight and bias in the compute type; kWeight / kBias: present).
template <bool kWeight, bool kBias, typename acc_t>
FD_HD acc_t affine_out(acc_t xhat, acc_t weight, acc_t bias) {
  const acc_t y = kWeight ? mul_rn(xhat, weight) : xhat;
  return kBias ? add_rn(y, bias) : y;
}

// xhat recovered from the output as stored (memory_efficient backward): (y - bias) / weight,
// with weight 1 and bias 0 where absent (then exact). Needs a weight with no zeros.
template <typename acc_t>
FD_HD acc_t xhat_from_y(acc_t y, acc_t weight, acc_t bias) {
  return div_rn(sub_rn(y, bias), weight);
}

// Backward: the gradient of h from g = dy * weight, xhat, the row's rstd and the row
// constants c1 = S(g * xhat) / n, c2 = S(g) / n (LayerNorm; RMSNorm has no c2):
//   LayerNorm (g - (xhat * c1 + c2)) * rstd,   RMSNorm (g - xhat * c1) * rstd.
template <bool kRms, typename acc_t>
FD_HD acc_t h_gradient(acc_t g, acc_t xhat, acc_t rstd, acc_t c1, acc_t c2) {
  const acc_t t = mul_rn(xhat, c1);
  return mul_rn(sub_rn(g, kRms ? t : add_rn(t, c2)), rstd);
}

// One forward call, as raw pointers (ops/fused_norm.cpp fills it; every tensor contiguous).
// Rows of `cols` elements; element (r, c) has mask index r * cols + c, or, with
// rows_per_sample > 0 (per_sample), the sample index r / rows_per_sample.
struct NormForwardArgs {
  DType dtype = DType::kFloat;  // input, input_bias and y
  bool wide_h = false;          // h and residual in fp32 (residual_in_fp32, a 16-bit dtype)
  bool weight_fp32 = false;     // weight and bias in fp32 (else in dtype)
  bool rms = false;
  const void* input = nullptr;
  const void* residual = nullptr;    // or null
  const void* input_bias = nullptr;  // [cols] or null
  const void* weight = nullptr;      // [cols] or null
  const void* bias = nullptr;        // [cols] or null (LayerNorm only)
  void* y = nullptr;
  void* h = nullptr;     // or null: h is computed but not stored
  void* mean = nullptr;  // [rows] in the compute type, or null (RMSNorm)
  void* rstd = nullptr;  // [rows] in the compute type
  int64_t rows = 0, cols = 0;
  int64_t rows_per_sample = 0;
  double eps = 0.0;
  MaskedAffine affine;  // make_affine(p, true, false, false)
};

// One backward call. dy (and dh_in) have y's (and h's) dtype; the outputs: grad_input in
// dtype, grad_h (the residual's gradient) in h's dtype, the column sums in the compute type.
struct NormBackwardArgs {
  DType dtype = DType::kFloat;
  bool wide_h = false;
  bool weight_fp32 = false;
  bool rms = false;
  const void* dy = nullptr;
  const void* dh_in = nullptr;   // the gradient flowing into h itself (prenorm), or null
  const void* saved = nullptr;   // h as stored (h's dtype), or y as stored (dtype) if saved_is_y
  bool saved_is_y = false;       // xhat = xhat_from_y(y, weight, bias), not from h and the mean
  const void* weight = nullptr;  // or null
  const void* bias = nullptr;    // weight's dtype, or null; read only if saved_is_y
  const void* mean = nullptr;    // or null (RMSNorm, saved_is_y)
  const void* rstd = nullptr;
  void* grad_input = nullptr;
  void* grad_h = nullptr;           // or null (not needed)
  void* grad_weight = nullptr;      // [cols] or null
  void* grad_bias = nullptr;        // [cols] or null
  void* grad_input_bias = nullptr;  // [cols] or null
  void* partials = nullptr;         // scratch: [sums][row_blocks(rows)][cols] compute type
  int64_t rows = 0, cols = 0;
  int64_t rows_per_sample = 0;
  MaskedAffine affine;  // make_affine(p, true, false, true)
};

}  // namespace fused_dropout
