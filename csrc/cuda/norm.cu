// CUDA kernels of the fused dropout + residual add + norm: indexing, 16-byte vector I/O, the
// contract's reduction order and launch geometry only. All arithmetic (Philox, the keep rule,
// the masked value, the row statistics, the per-element formulas) comes from core/ (norm.h,
// masked_op.h, keep.h), the code the CPU test suite executes.
//
// The reduction contract (core/norm.h): a row of n elements has G = norm_groups(n) groups; a
// warp owns a group, lane t the chunks t, t + 32, ... of each of its stripes (stripe s belongs
// to group s % G), with 8 accumulators (one per element of a chunk) that add the lane's
// elements in increasing order. Then chunk_tree, the lane tree as a butterfly of xor shuffles
// (a + b == b + a, so every lane ends with the halving tree's value), and the group tree over
// the G warps' values in shared memory (halving_tree, in place).
//
// Forward: a block of kWarps warps holds kWarps / G rows at a time and strides over the rows.
// A lane keeps its h values in registers (kCache chunks: rows up to G * 2048 elements, i.e.
// every row up to 16384) for the two statistics and y; a longer row is swept three times
// (LayerNorm; RMSNorm twice), each sweep recomputing h from the input (the mask regenerated
// from the pair), storing it only in the first.
//
// Backward: a block takes one block of kRowBlock rows (grid-stride over the blocks). First
// the row constants c1, c2 of its rows (kWarps / G rows at a time, the same trees), into
// shared memory; then each thread takes chunks of the row and walks the block's rows in
// order: dh, grad_input (the mask regenerated, never stored), grad_h, and the column partials
// in registers, written once per chunk: the block's partial in row order. A second kernel
// adds the partials in block order (core/norm.h's column-sum contract).
//
// Philox: one call per 8 mask elements (keep_bits8: the group of the chunk's first element,
// and the next group when a row's length is not a multiple of 8 and the chunk straddles two).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/PhiloxUtils.cuh>

#include "cuda/launch.h"
#include "cuda/norm.h"
#include "cuda/pairs.h"

namespace fused_dropout {
namespace {

using launch::aligned16;

constexpr int kWarps = 8;                  // warps of a block
constexpr int kThreads = kWarps * kLanes;  // 256
constexpr int kCache = 8;                  // chunks of h a forward lane keeps in registers
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// How a dtype is stored and converted on the GPU, element by element.
template <DType D>
struct Dev;
template <>
struct Dev<DType::kFloat> {
  using raw = float;
  using acc = float;
  static __device__ __forceinline__ acc load(raw v) { return v; }
  static __device__ __forceinline__ raw store(acc v) { return v; }
};
template <>
struct Dev<DType::kDouble> {
  using raw = double;
  using acc = double;
  static __device__ __forceinline__ acc load(raw v) { return v; }
  static __device__ __forceinline__ raw store(acc v) { return v; }
};
template <>
struct Dev<DType::kHalf> {
  using raw = unsigned short;
  using acc = float;
  static __device__ __forceinline__ acc load(raw v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ raw store(acc v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
// bf16 is stored by pairs (round_chunk); a NaN becomes 0x7FC0, as on the CPU.
template <>
struct Dev<DType::kBFloat16> {
  using raw = unsigned short;
  using acc = float;
  static __device__ __forceinline__ acc load(raw v) { return bf16_bits_to_float(v); }
};

// One chunk (kChunk elements) of an operand: 16-byte vectors or elements.
template <typename raw>
union Chunk {
  uint4 v[kChunk * sizeof(raw) / sizeof(uint4)];
  uint32_t w[kChunk * sizeof(raw) / sizeof(uint32_t)];
  raw e[kChunk];
};

// A chunk's results rounded to D: bf16 a pair per instruction (cuda/pairs.h), the others
// element by element (fp16 has a one-instruction conversion).
template <DType D>
__device__ __forceinline__ void round_chunk(const typename Dev<D>::acc (&v)[kChunk],
                                            Chunk<typename Dev<D>::raw>& out) {
  if constexpr (D == DType::kBFloat16) {
    round_bf16_pairs<kChunk / 2>(v, out.w);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out.e[j] = Dev<D>::store(v[j]);
  }
}

// The chunk at c0 of a row of n elements: as vectors (vector: whole and aligned), else element
// by element up to n (the rest 0).
template <typename raw>
__device__ __forceinline__ void load_chunk(const raw* row, int64_t c0, int64_t n, bool vector,
                                           Chunk<raw>& dst) {
  if (vector) {
    const uint4* p = reinterpret_cast<const uint4*>(row + c0);
#pragma unroll
    for (int q = 0; q < int(sizeof(dst.v) / sizeof(uint4)); ++q) dst.v[q] = p[q];
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) dst.e[j] = c0 + j < n ? row[c0 + j] : raw(0);
  }
}

template <typename raw>
__device__ __forceinline__ void store_chunk(raw* row, int64_t c0, int64_t n, bool vector,
                                            const Chunk<raw>& src) {
  if (vector) {
    uint4* p = reinterpret_cast<uint4*>(row + c0);
    // __stwb: one st.global.v4 per vector (a plain assignment from the union was split into
    // narrower stores by the compiler)
#pragma unroll
    for (int q = 0; q < int(sizeof(src.v) / sizeof(uint4)); ++q) __stwb(p + q, src.v[q]);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (c0 + j < n) row[c0 + j] = src.e[j];
    }
  }
}

// A [cols] vector's chunk (weight, bias, input_bias) in the compute type: in fp32 or in the
// dtype, or `neutral` where absent (1 for a weight, -0 or +0 for a bias), as the CPU's
// row_vector gives it.
template <DType D, typename acc>
__device__ __forceinline__ void load_columns(const void* p, bool fp32, int64_t c0, int64_t n,
                                             bool vector, acc neutral, acc (&out)[kChunk]) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = neutral;
  } else if (fp32) {
    Chunk<float> t;
    load_chunk(static_cast<const float*>(p), c0, n, vector, t);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = static_cast<acc>(t.e[j]);
  } else {
    Chunk<typename Dev<D>::raw> t;
    load_chunk(static_cast<const typename Dev<D>::raw*>(p), c0, n, vector, t);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = Dev<D>::load(t.e[j]);
  }
}

// Keep bits of the chunk whose first element has mask index m (bit j: element m + j): the
// counter group of m, and the next one when m is not a multiple of 8.
__device__ __forceinline__ uint32_t chunk_keep(const PhiloxStream& stream, const KeepRule& rule,
                                               uint64_t m) {
  const uint64_t g = m / kMaskPerCall;
  const int shift = static_cast<int>(m % kMaskPerCall);
  uint32_t bits = keep_bits8(stream, rule, g) >> shift;
  if (shift != 0) bits |= keep_bits8(stream, rule, g + 1) << (kMaskPerCall - shift);
  return bits & 0xFFu;
}

// Where the calling thread stands in a block of kWarps warps of which each G make one row.
struct RowSlot {
  int groups;  // G
  int slot;    // which of the block's kWarps / G rows
  int group;   // g: which warp of the row
  int lane;    // t
  __device__ static RowSlot make(int groups) {
    const int warp = static_cast<int>(threadIdx.y);
    return {groups, warp / groups, warp % groups, static_cast<int>(threadIdx.x)};
  }
};

// The contract's total of a row from each lane's 8 accumulators: chunk_tree, the lane tree
// (xor butterfly), the group tree (shared memory). Every thread of the block calls it.
template <typename acc>
__device__ __forceinline__ acc row_total(const acc (&a)[kChunk], const RowSlot& s) {
  acc v = chunk_tree(a);
#pragma unroll
  for (int half = kLanes / 2; half > 0; half /= 2) {
    v = add_rn(v, __shfl_xor_sync(kFullWarp, v, half));
  }
  if (s.groups == 1) return v;
  __shared__ acc per_group[kWarps], per_row[kWarps];
  if (s.lane == 0) per_group[s.slot * s.groups + s.group] = v;
  __syncthreads();
  if (s.group == 0 && s.lane == 0) {
    per_row[s.slot] = halving_tree(per_group + s.slot * s.groups, s.groups);
  }
  __syncthreads();
  return per_row[s.slot];
}

template <typename acc>
__device__ __forceinline__ void zero(acc (&a)[kChunk]) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) a[j] = acc(0);
}

// The pair: from pair_in (backward), else unpacked from the Philox state (graph-safe) and
// written to pair_out by one thread.
__device__ __forceinline__ PhiloxStream kernel_stream(const at::PhiloxCudaState& philox,
                                                      const int64_t* pair_in, int64_t* pair_out) {
  uint64_t seed, offset;
  if (pair_in != nullptr) {
    seed = static_cast<uint64_t>(pair_in[0]);
    offset = static_cast<uint64_t>(pair_in[1]);
  } else {
    const auto pair = at::cuda::philox::unpack(philox);
    seed = std::get<0>(pair);
    offset = std::get<1>(pair);
    if (pair_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0) {
      pair_out[0] = static_cast<int64_t>(seed);
      pair_out[1] = static_cast<int64_t>(offset);
    }
  }
  return PhiloxStream::make(seed, offset);
}

// ---------------------------------------------------------------- forward

template <typename acc>
struct ForwardParams {
  NormForwardArgs a;
  AffineConsts<acc> consts;
  acc eps;
  KeepRule rule;
  int groups;     // norm_groups(cols)
  bool vec_rows;  // x, residual, h, y: every row start 16-byte aligned
  bool vec_cols;  // weight, bias, input_bias 16-byte aligned
  at::PhiloxCudaState philox;
  int64_t* pair_out;
};

// h of the chunk at c0 of row r (hv: as stored, in the compute type), stored if `store`.
// sample_bits: the row's keep bits with per_sample (all or none), else unused.
template <DType D, bool kWide>
__device__ __forceinline__ void chunk_h(const ForwardParams<typename Dev<D>::acc>& p,
                                        const PhiloxStream& stream, int64_t r, int64_t c0,
                                        uint32_t sample_bits, bool store,
                                        typename Dev<D>::acc (&hv)[kChunk]) {
  using S = Dev<D>;
  using Hs = Dev<kWide ? DType::kFloat : D>;
  using raw = typename S::raw;
  using hraw = typename Hs::raw;
  using acc = typename S::acc;
  const NormForwardArgs& a = p.a;
  const int64_t n = a.cols;
  const bool vector = p.vec_rows && c0 + kChunk <= n;
  Chunk<raw> x;
  load_chunk(static_cast<const raw*>(a.input) + r * n, c0, n, vector, x);
  Chunk<hraw> res;
  if (a.residual != nullptr) {
    load_chunk(static_cast<const hraw*>(a.residual) + r * n, c0, n, vector, res);
  }
  acc input_bias[kChunk];
  load_columns<D>(a.input_bias, false, c0, n, p.vec_cols && c0 + kChunk <= n, acc(-0.0),
                  input_bias);
  uint32_t bits = 0xFFu;
  if (!a.affine.keep_all) {
    bits = a.rows_per_sample > 0 ? sample_bits
                                 : chunk_keep(stream, p.rule, static_cast<uint64_t>(r * n + c0));
  }
  acc v[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    v[j] = masked_value<false>(((bits >> j) & 1u) != 0, add_rn(S::load(x.e[j]), input_bias[j]),
                               p.consts);
    if (a.residual != nullptr) v[j] = add_rn(v[j], Hs::load(res.e[j]));
  }
  Chunk<hraw> stored;
  round_chunk<kWide ? DType::kFloat : D>(v, stored);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) hv[j] = Hs::load(stored.e[j]);  // stats and y from h as stored
  if (store && a.h != nullptr) store_chunk(static_cast<hraw*>(a.h) + r * n, c0, n, vector, stored);
}

// y of the chunk at c0 of row r from its h.
template <DType D, bool kRms>
__device__ __forceinline__ void chunk_y(const ForwardParams<typename Dev<D>::acc>& p, int64_t r,
                                        int64_t c0, const typename Dev<D>::acc (&hv)[kChunk],
                                        const RowStats<typename Dev<D>::acc>& stats) {
  using S = Dev<D>;
  using acc = typename S::acc;
  const NormForwardArgs& a = p.a;
  const int64_t n = a.cols;
  const bool vec_cols = p.vec_cols && c0 + kChunk <= n;
  acc weight[kChunk], bias[kChunk];
  load_columns<D>(a.weight, a.weight_fp32, c0, n, vec_cols, acc(1), weight);
  load_columns<D>(a.bias, a.weight_fp32, c0, n, vec_cols, acc(-0.0), bias);
  acc out[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    out[j] = affine_out<true, true>(normalized<kRms>(hv[j], stats), weight[j], bias[j]);
  }
  Chunk<typename S::raw> y;
  round_chunk<D>(out, y);
  store_chunk(static_cast<typename S::raw*>(a.y) + r * n, c0, n, p.vec_rows && c0 + kChunk <= n, y);
}

// Adds the chunk's elements below n (v, or with kSquare the squared deviation from mean) into
// the lane's accumulators.
template <bool kRms, bool kSquare, typename acc>
__device__ __forceinline__ void accumulate(acc (&a)[kChunk], const acc (&hv)[kChunk], int64_t c0,
                                           int64_t n, acc mean) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (c0 + j < n) {
      acc v = hv[j];
      if (kSquare) {
        const acc d = deviation<kRms>(v, mean);
        v = mul_rn(d, d);
      }
      a[j] = add_rn(a[j], v);
    }
  }
}

// kCache > 0: the row's h kept in registers (rows up to G * kStripe * kCache elements);
// kCache == 0: any row, h recomputed in each sweep.
template <DType D, bool kWide, bool kRms, int kCacheChunks>
__global__ void __launch_bounds__(kThreads)
    norm_forward_kernel(const ForwardParams<typename Dev<D>::acc> p) {
  using acc = typename Dev<D>::acc;
  const NormForwardArgs& a = p.a;
  const PhiloxStream stream = kernel_stream(p.philox, nullptr, p.pair_out);
  const RowSlot s = RowSlot::make(p.groups);
  const int64_t n = a.cols;
  const int rows_per_block = kWarps / p.groups;
  const int64_t stripes = (n + kStripe - 1) / kStripe;
  // The first element of the lane's chunk in the group's k-th stripe.
  const auto chunk_start = [&](int64_t k) {
    return ((s.group + k * p.groups) * kLanes + s.lane) * int64_t(kChunk);
  };
  for (int64_t base = int64_t(blockIdx.x) * rows_per_block; base < a.rows;
       base += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = base + s.slot;
    const bool live = r < a.rows;
    const int64_t len = live ? n : 0;  // a slot past the last row joins the trees with zeros
    uint32_t sample_bits = 0;
    if (live && a.rows_per_sample > 0 && !a.affine.keep_all) {
      const uint64_t m = static_cast<uint64_t>(r / a.rows_per_sample);
      const uint32_t bit = keep_bits8(stream, p.rule, m / kMaskPerCall) >> (m % kMaskPerCall);
      sample_bits = (bit & 1u) != 0 ? 0xFFu : 0u;
    }
    RowStats<acc> stats{acc(0), acc(0)};
    acc sums[kChunk];
    if constexpr (kCacheChunks > 0) {
      acc hv[kCacheChunks][kChunk];
      zero(sums);
#pragma unroll
      for (int k = 0; k < kCacheChunks; ++k) {
        const int64_t c0 = chunk_start(k);
        if (c0 < len) {
          chunk_h<D, kWide>(p, stream, r, c0, sample_bits, true, hv[k]);
          accumulate<kRms, false>(sums, hv[k], c0, len, acc(0));
        }
      }
      if (!kRms) {
        stats.mean = row_mean(row_total(sums, s), n);
        zero(sums);
#pragma unroll
        for (int k = 0; k < kCacheChunks; ++k) {
          const int64_t c0 = chunk_start(k);
          if (c0 < len) accumulate<kRms, true>(sums, hv[k], c0, len, stats.mean);
        }
      } else {  // RMSNorm: the squares of h, from the same sweep
        zero(sums);
#pragma unroll
        for (int k = 0; k < kCacheChunks; ++k) {
          const int64_t c0 = chunk_start(k);
          if (c0 < len) accumulate<kRms, true>(sums, hv[k], c0, len, acc(0));
        }
      }
      stats.rstd = row_rstd(row_total(sums, s), n, p.eps);
#pragma unroll
      for (int k = 0; k < kCacheChunks; ++k) {
        const int64_t c0 = chunk_start(k);
        if (c0 < len) chunk_y<D, kRms>(p, r, c0, hv[k], stats);
      }
    } else {
      acc hv[kChunk];
      // 32-bit: a 64-bit division is a subroutine call
      const int own = live ? (static_cast<int>(stripes) - s.group + p.groups - 1) / p.groups : 0;
      if (!kRms) {
        zero(sums);
#pragma unroll 1
        for (int k = 0; k < own; ++k) {
          const int64_t c0 = chunk_start(k);
          if (c0 < len) {
            chunk_h<D, kWide>(p, stream, r, c0, sample_bits, true, hv);
            accumulate<kRms, false>(sums, hv, c0, len, acc(0));
          }
        }
        stats.mean = row_mean(row_total(sums, s), n);
      }
      zero(sums);
#pragma unroll 1
      for (int k = 0; k < own; ++k) {
        const int64_t c0 = chunk_start(k);
        if (c0 < len) {
          chunk_h<D, kWide>(p, stream, r, c0, sample_bits, kRms, hv);
          accumulate<kRms, true>(sums, hv, c0, len, stats.mean);
        }
      }
      stats.rstd = row_rstd(row_total(sums, s), n, p.eps);
#pragma unroll 1
      for (int k = 0; k < own; ++k) {
        const int64_t c0 = chunk_start(k);
        if (c0 < len) {
          chunk_h<D, kWide>(p, stream, r, c0, sample_bits, false, hv);
          chunk_y<D, kRms>(p, r, c0, hv, stats);
        }
      }
    }
    if (live && s.group == 0 && s.lane == 0) {
      if (!kRms) static_cast<acc*>(a.mean)[r] = stats.mean;
      static_cast<acc*>(a.rstd)[r] = stats.rstd;
    }
  }
}

// ---------------------------------------------------------------- backward

template <typename acc>
struct BackwardParams {
  NormBackwardArgs a;
  AffineConsts<acc> consts;
  KeepRule rule;
  int groups;
  bool vec_rows;      // dy, saved, dh_in, grad_input, grad_h: every row start 16-byte aligned
  bool vec_cols;      // weight, bias 16-byte aligned
  bool vec_partials;  // every row of the partials 16-byte aligned
  acc* partial[3];    // the slabs [row_blocks][cols] of grad_weight, grad_bias, grad_input_bias
  const int64_t* pair_in;
};

// xhat, dy and g = dy * weight of the chunk at c0 of row r.
template <DType D, bool kWide, bool kRms>
__device__ __forceinline__ void chunk_grad_inputs(const BackwardParams<typename Dev<D>::acc>& p,
                                                  int64_t r, int64_t c0,
                                                  const RowStats<typename Dev<D>::acc>& stats,
                                                  typename Dev<D>::acc (&xhat)[kChunk],
                                                  typename Dev<D>::acc (&dy)[kChunk],
                                                  typename Dev<D>::acc (&g)[kChunk]) {
  using S = Dev<D>;
  using Hs = Dev<kWide ? DType::kFloat : D>;
  using raw = typename S::raw;
  using hraw = typename Hs::raw;
  using acc = typename S::acc;
  const NormBackwardArgs& a = p.a;
  const int64_t n = a.cols;
  const bool vector = p.vec_rows && c0 + kChunk <= n;
  const bool vec_cols = p.vec_cols && c0 + kChunk <= n;
  acc weight[kChunk];
  load_columns<D>(a.weight, a.weight_fp32, c0, n, vec_cols, acc(1), weight);
  if (a.saved_is_y) {
    acc bias[kChunk];
    load_columns<D>(a.bias, a.weight_fp32, c0, n, vec_cols, acc(0), bias);
    Chunk<raw> y;
    load_chunk(static_cast<const raw*>(a.saved) + r * n, c0, n, vector, y);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) xhat[j] = xhat_from_y(S::load(y.e[j]), weight[j], bias[j]);
  } else {
    Chunk<hraw> h;
    load_chunk(static_cast<const hraw*>(a.saved) + r * n, c0, n, vector, h);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) xhat[j] = normalized<kRms>(Hs::load(h.e[j]), stats);
  }
  Chunk<raw> d;
  load_chunk(static_cast<const raw*>(a.dy) + r * n, c0, n, vector, d);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    dy[j] = S::load(d.e[j]);
    g[j] = mul_rn(dy[j], weight[j]);
  }
}

template <typename acc>
__device__ __forceinline__ RowStats<acc> saved_stats(const NormBackwardArgs& a, bool rms,
                                                     int64_t r) {
  return {rms || a.saved_is_y ? acc(0) : static_cast<const acc*>(a.mean)[r],
          static_cast<const acc*>(a.rstd)[r]};
}

// A block per block of kRowBlock rows (grid-stride): the rows' c1, c2 (kWarps / G rows at a
// time), then per chunk the rows in order: gradients, and the block's column partials.
template <DType D, bool kWide, bool kRms>
__global__ void __launch_bounds__(kThreads)
    norm_backward_kernel(const BackwardParams<typename Dev<D>::acc> p) {
  using S = Dev<D>;
  using Hs = Dev<kWide ? DType::kFloat : D>;
  using raw = typename S::raw;
  using hraw = typename Hs::raw;
  using acc = typename S::acc;
  const NormBackwardArgs& a = p.a;
  const PhiloxStream stream = kernel_stream(at::PhiloxCudaState(), p.pair_in, nullptr);
  const RowSlot s = RowSlot::make(p.groups);
  const int64_t n = a.cols;
  const int rows_at_once = kWarps / p.groups;
  const int64_t stripes = (n + kStripe - 1) / kStripe;
  const int64_t own = (stripes - s.group + p.groups - 1) / p.groups;
  const int64_t blocks = row_blocks(a.rows);
  const int thread = static_cast<int>(threadIdx.y) * kLanes + static_cast<int>(threadIdx.x);
  __shared__ acc c1[kRowBlock], c2[kRowBlock];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t r0 = b * kRowBlock;
    const int64_t left = a.rows - r0;
    const int in_block = static_cast<int>(left < kRowBlock ? left : kRowBlock);
    for (int i0 = 0; i0 < kRowBlock; i0 += rows_at_once) {
      const int i = i0 + s.slot;
      const bool live = i < in_block;
      const int64_t r = r0 + i;
      acc sum_gx[kChunk], sum_g[kChunk];
      zero(sum_gx);
      zero(sum_g);
      if (live) {
        const RowStats<acc> stats = saved_stats<acc>(a, kRms, r);
        for (int64_t k = 0; k < own; ++k) {
          const int64_t c0 = ((s.group + k * p.groups) * kLanes + s.lane) * int64_t(kChunk);
          if (c0 >= n) continue;
          acc xhat[kChunk], dy[kChunk], g[kChunk];
          chunk_grad_inputs<D, kWide, kRms>(p, r, c0, stats, xhat, dy, g);
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            if (c0 + j < n) {
              sum_gx[j] = add_rn(sum_gx[j], mul_rn(g[j], xhat[j]));
              sum_g[j] = add_rn(sum_g[j], g[j]);
            }
          }
        }
      }
      const acc total_gx = row_total(sum_gx, s);
      const acc total_g = row_total(sum_g, s);
      if (live && s.group == 0 && s.lane == 0) {
        c1[i] = row_mean(total_gx, n);
        c2[i] = kRms ? acc(0) : row_mean(total_g, n);
      }
    }
    __syncthreads();
    for (int64_t c0 = int64_t(thread) * kChunk; c0 < n; c0 += int64_t(kThreads) * kChunk) {
      const bool vector = p.vec_rows && c0 + kChunk <= n;
      acc part[3][kChunk];
      zero(part[0]);
      zero(part[1]);
      zero(part[2]);
      for (int i = 0; i < in_block; ++i) {
        const int64_t r = r0 + i;
        const RowStats<acc> stats = saved_stats<acc>(a, kRms, r);
        acc xhat[kChunk], dy[kChunk], g[kChunk];
        chunk_grad_inputs<D, kWide, kRms>(p, r, c0, stats, xhat, dy, g);
        uint32_t bits = 0xFFu;
        if (!a.affine.keep_all) {
          if (a.rows_per_sample > 0) {
            const uint64_t m = static_cast<uint64_t>(r / a.rows_per_sample);
            bits = (keep_bits8(stream, p.rule, m / kMaskPerCall) >> (m % kMaskPerCall)) & 1u ? 0xFFu
                                                                                             : 0u;
          } else {
            bits = chunk_keep(stream, p.rule, static_cast<uint64_t>(r * n + c0));
          }
        }
        Chunk<hraw> dh_in, grad_h;
        if (a.dh_in != nullptr) {
          load_chunk(static_cast<const hraw*>(a.dh_in) + r * n, c0, n, vector, dh_in);
        }
        acc dh[kChunk], dxv[kChunk];
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          dh[j] = h_gradient<kRms>(g[j], xhat[j], stats.rstd, c1[i], c2[i]);
          if (a.dh_in != nullptr) dh[j] = add_rn(dh[j], Hs::load(dh_in.e[j]));
          dxv[j] = masked_value<false>(((bits >> j) & 1u) != 0, dh[j], p.consts);
        }
        Chunk<raw> dx;
        if (a.grad_h != nullptr) round_chunk<kWide ? DType::kFloat : D>(dh, grad_h);
        round_chunk<D>(dxv, dx);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          part[0][j] = add_rn(part[0][j], mul_rn(dy[j], xhat[j]));
          part[1][j] = add_rn(part[1][j], dy[j]);
          part[2][j] = add_rn(part[2][j], S::load(dx.e[j]));
        }
        if (a.grad_h != nullptr) {
          store_chunk(static_cast<hraw*>(a.grad_h) + r * n, c0, n, vector, grad_h);
        }
        store_chunk(static_cast<raw*>(a.grad_input) + r * n, c0, n, vector, dx);
      }
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        if (p.partial[q] == nullptr) continue;
        Chunk<acc> out;
#pragma unroll
        for (int j = 0; j < kChunk; ++j) out.e[j] = part[q][j];
        store_chunk(p.partial[q] + b * n, c0, n, p.vec_partials && c0 + kChunk <= n, out);
      }
    }
    __syncthreads();  // c1 and c2 are the next block's
  }
}

// The column sums: each column's partials added in block order (core/norm.h). Strided: a
// thread walks one column down the blocks (reads coalesced across the warp, no vectors).
template <typename acc>
struct TotalsParams {
  const acc* partial[3];
  acc* out[3];
  int64_t blocks, cols;
};

template <typename acc>
__global__ void __launch_bounds__(kThreads)
    strided_column_totals_kernel(const TotalsParams<acc> p) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < 3 * p.cols; i += step) {
    const int q = static_cast<int>(i / p.cols);
    const int64_t c = i - q * p.cols;
    // selected, not indexed: an indexed parameter array would be copied to local memory
    acc* const out = q == 0 ? p.out[0] : q == 1 ? p.out[1] : p.out[2];
    const acc* const partial = q == 0 ? p.partial[0] : q == 1 ? p.partial[1] : p.partial[2];
    if (out == nullptr) continue;
    acc total = acc(0);
    for (int64_t b = 0; b < p.blocks; ++b) total = add_rn(total, partial[b * p.cols + c]);
    out[c] = total;
  }
}

// Every row of `cols` elements of `size` bytes starts 16-byte aligned at `ptr`.
bool rows_aligned(const void* ptr, int64_t cols, size_t size) {
  return aligned16(ptr) && (cols * int64_t(size)) % 16 == 0;
}

template <DType D, bool kWide, bool kRms>
cudaError_t forward_typed(const NormForwardArgs& a, at::PhiloxCudaState philox, int64_t* pair_out,
                          cudaStream_t stream) {
  using S = Dev<D>;
  using acc = typename S::acc;
  using hraw = typename Dev<kWide ? DType::kFloat : D>::raw;
  ForwardParams<acc> p;
  p.a = a;
  p.consts = AffineConsts<acc>::make(a.affine);
  p.eps = static_cast<acc>(a.eps);
  p.rule = KeepRule::make(a.affine.threshold);
  p.groups = norm_groups(a.cols);
  const size_t raw_size = sizeof(typename S::raw);
  p.vec_rows = rows_aligned(a.input, a.cols, raw_size) && rows_aligned(a.y, a.cols, raw_size) &&
               rows_aligned(a.residual, a.cols, sizeof(hraw)) &&
               rows_aligned(a.h, a.cols, sizeof(hraw));
  p.vec_cols = aligned16(a.weight) && aligned16(a.bias) && aligned16(a.input_bias);
  p.philox = philox;
  p.pair_out = pair_out;
  const dim3 block(kLanes, kWarps);
  const int64_t rows_per_block = kWarps / p.groups;
  if (a.cols <= int64_t(p.groups) * kStripe * kCache) {
    constexpr auto kernel = norm_forward_kernel<D, kWide, kRms, kCache>;
    kernel<<<launch::grid_for<kernel, kThreads>(a.rows, rows_per_block), block, 0, stream>>>(p);
  } else {
    constexpr auto kernel = norm_forward_kernel<D, kWide, kRms, 0>;
    kernel<<<launch::grid_for<kernel, kThreads>(a.rows, rows_per_block), block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// fn(D, kWide, kRms) for the call's dtype and flags (wide only for the 16-bit dtypes).
template <template <DType, bool, bool> class Fn, typename Args, typename... Rest>
cudaError_t dispatch(const Args& a, Rest... rest) {
  switch (a.dtype) {
    case DType::kFloat:
      return a.rms ? Fn<DType::kFloat, false, true>::run(a, rest...)
                   : Fn<DType::kFloat, false, false>::run(a, rest...);
    case DType::kDouble:
      return a.rms ? Fn<DType::kDouble, false, true>::run(a, rest...)
                   : Fn<DType::kDouble, false, false>::run(a, rest...);
    case DType::kHalf:
      if (a.wide_h) {
        return a.rms ? Fn<DType::kHalf, true, true>::run(a, rest...)
                     : Fn<DType::kHalf, true, false>::run(a, rest...);
      }
      return a.rms ? Fn<DType::kHalf, false, true>::run(a, rest...)
                   : Fn<DType::kHalf, false, false>::run(a, rest...);
    case DType::kBFloat16:
      if (a.wide_h) {
        return a.rms ? Fn<DType::kBFloat16, true, true>::run(a, rest...)
                     : Fn<DType::kBFloat16, true, false>::run(a, rest...);
      }
      return a.rms ? Fn<DType::kBFloat16, false, true>::run(a, rest...)
                   : Fn<DType::kBFloat16, false, false>::run(a, rest...);
  }
  return cudaErrorInvalidValue;
}

template <DType D, bool kWide, bool kRms>
struct Forward {
  static cudaError_t run(const NormForwardArgs& a, at::PhiloxCudaState philox, int64_t* pair_out,
                         cudaStream_t stream) {
    return forward_typed<D, kWide, kRms>(a, philox, pair_out, stream);
  }
};

template <DType D, bool kWide, bool kRms>
struct Backward {
  static cudaError_t run(const NormBackwardArgs& a, const int64_t* pair_in, cudaStream_t stream) {
    using S = Dev<D>;
    using acc = typename S::acc;
    using hraw = typename Dev<kWide ? DType::kFloat : D>::raw;
    BackwardParams<acc> p;
    p.a = a;
    p.consts = AffineConsts<acc>::make(a.affine);
    p.rule = KeepRule::make(a.affine.threshold);
    p.groups = norm_groups(a.cols);
    const size_t raw_size = sizeof(typename S::raw);
    p.vec_rows =
        rows_aligned(a.dy, a.cols, raw_size) && rows_aligned(a.grad_input, a.cols, raw_size) &&
        rows_aligned(a.saved, a.cols, a.saved_is_y ? raw_size : sizeof(hraw)) &&
        rows_aligned(a.dh_in, a.cols, sizeof(hraw)) && rows_aligned(a.grad_h, a.cols, sizeof(hraw));
    p.vec_cols = aligned16(a.weight) && aligned16(a.bias);
    p.vec_partials = rows_aligned(a.partials, a.cols, sizeof(acc));
    const int64_t blocks = row_blocks(a.rows);
    // The slabs, in the order of the sums asked for (ops/fused_norm.cpp's partials).
    acc* next = static_cast<acc*>(a.partials);
    void* const outs[3] = {a.grad_weight, a.grad_bias, a.grad_input_bias};
    TotalsParams<acc> t;
    for (int q = 0; q < 3; ++q) {
      p.partial[q] = outs[q] != nullptr ? next : nullptr;
      if (outs[q] != nullptr) next += blocks * a.cols;
      t.partial[q] = p.partial[q];
      t.out[q] = static_cast<acc*>(outs[q]);
    }
    t.blocks = blocks;
    t.cols = a.cols;
    p.pair_in = pair_in;
    constexpr auto kernel = norm_backward_kernel<D, kWide, kRms>;
    kernel<<<launch::grid_for<kernel, kThreads>(blocks, 1), dim3(kLanes, kWarps), 0, stream>>>(p);
    if (t.out[0] != nullptr || t.out[1] != nullptr || t.out[2] != nullptr) {
      constexpr auto totals = strided_column_totals_kernel<acc>;
      totals<<<launch::grid_for<totals, kThreads>(3 * a.cols, kThreads), kThreads, 0, stream>>>(t);
    }
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t norm_forward_cuda(const NormForwardArgs& args, at::PhiloxCudaState philox,
                              int64_t* pair_out, cudaStream_t stream) {
  return dispatch<Forward>(args, philox, pair_out, stream);
}

cudaError_t norm_backward_cuda(const NormBackwardArgs& args, const int64_t* pair_in,
                               cudaStream_t stream) {
  return dispatch<Backward>(args, pair_in, stream);
}

}  // namespace fused_dropout
