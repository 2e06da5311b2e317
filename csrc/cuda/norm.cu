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
// A lane keeps its h values in registers (kCache chunks: rows of whole 16-byte chunks up to
// G * 2048 elements, i.e. every common hidden size up to 16384; fp64 half that) for the two
// statistics and y; any other row is swept three times (LayerNorm; RMSNorm twice), each sweep
// recomputing h from the input (the mask regenerated from the pair), storing it only in the
// first.
//
// Backward: a block takes one block of kRowBlock rows (grid-stride over the blocks). First
// the row constants c1, c2 of its rows (kWarps / G rows at a time, the same trees), into
// shared memory; then each thread takes chunks of the row and walks the block's rows in
// order: dh, grad_input (the mask regenerated, never stored), grad_h, and the column partials
// in registers, written once per chunk: the block's partial in row order. A second kernel
// adds the partials in block order (core/norm.h's column-sum contract).
//
// Philox: one call per 8 mask elements. A chunk of a whole-chunk row is one counter group,
// decided straight from its words (mask_group); otherwise keep_bits8 of the group of the
// chunk's first element, and of the next when the chunk straddles two (chunk_keep).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/PhiloxUtils.cuh>
#include <type_traits>

#include "cuda/launch.h"
#include "cuda/norm.h"
#include "cuda/pairs.h"

namespace fused_dropout {
namespace {

using launch::aligned16;

constexpr int kWarps = 8;                  // warps of a block
constexpr int kThreads = kWarps * kLanes;  // 256
// Chunks of h a forward lane keeps in registers (fp64's 8 would spill).
template <DType D>
constexpr int kCache = D == DType::kDouble ? 4 : 8;
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

// A chunk's elements in the compute type. bf16 from its words, two elements per word (the low
// half shifted up, the high half masked: what bf16_bits_to_float does to each), where element
// by element the compiler first moves each high half down.
template <DType D>
__device__ __forceinline__ void to_acc(const Chunk<typename Dev<D>::raw>& c,
                                       typename Dev<D>::acc (&out)[kChunk]) {
  if constexpr (D == DType::kBFloat16) {
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      out[2 * i] = __uint_as_float(c.w[i] << 16);
      out[2 * i + 1] = __uint_as_float(c.w[i] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = Dev<D>::load(c.e[j]);
  }
}

// A chunk's results rounded to D: bf16 a pair per instruction (cuda/pairs.h), the others
// element by element (fp16 has a one-instruction conversion). kNanLater: a bf16 NaN is left as
// the hardware rounds it, for the caller to fix (it knows of one some other way).
template <DType D, bool kNanLater = false>
__device__ __forceinline__ void round_chunk(const typename Dev<D>::acc (&v)[kChunk],
                                            Chunk<typename Dev<D>::raw>& out) {
  if constexpr (D == DType::kBFloat16 && kNanLater) {
    pack_bf16_pairs<kChunk / 2>(v, out.w);
  } else if constexpr (D == DType::kBFloat16) {
    round_bf16_pairs<kChunk / 2>(v, out.w);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out.e[j] = Dev<D>::store(v[j]);
  }
}

// The chunk at c0 of a row of n elements: as vectors (vector: whole and aligned), else element
// by element up to n (the rest 0).
template <typename raw, typename I>
__device__ __forceinline__ void load_chunk(const raw* row, I c0, int64_t n, bool vector,
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

template <typename raw, typename I>
__device__ __forceinline__ void store_chunk(raw* row, I c0, int64_t n, bool vector,
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
template <DType D, typename acc, typename I>
__device__ __forceinline__ void load_present_columns(const void* p, bool fp32, I c0, int64_t n,
                                                     bool vector, acc (&out)[kChunk]) {
  if (fp32) {
    Chunk<float> t;
    load_chunk(static_cast<const float*>(p), c0, n, vector, t);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = static_cast<acc>(t.e[j]);
  } else {
    Chunk<typename Dev<D>::raw> t;
    load_chunk(static_cast<const typename Dev<D>::raw*>(p), c0, n, vector, t);
    to_acc<D>(t, out);
  }
}
template <DType D, typename acc, typename I>
__device__ __forceinline__ void load_columns(const void* p, bool fp32, I c0, int64_t n, bool vector,
                                             acc neutral, acc (&out)[kChunk]) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = neutral;
  } else {
    load_present_columns<D>(p, fp32, c0, n, vector, out);
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

// v[j] = masked_value(keep of element j, v[j]) for a chunk's keep bits (bit j: element j).
template <typename acc>
__device__ __forceinline__ void mask_bits(uint32_t bits, const AffineConsts<acc>& consts,
                                          acc (&v)[kChunk]) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j)
    v[j] = masked_value<false>(((bits >> j) & 1u) != 0, v[j], consts);
}

// The same for a chunk whose 8 elements are counter group g (a row of whole chunks). Without a
// tie (all but about 8 * 2^-16 of the groups) the first draw decides every element straight
// from its number, never packed into bits: dropout.cu's path.
template <typename acc>
__device__ __forceinline__ void mask_group(const PhiloxStream& stream, const KeepRule& rule,
                                           uint64_t g, const AffineConsts<acc>& consts,
                                           acc (&v)[kChunk]) {
  const PhiloxBlock b = stream.group(g);
  if (__builtin_expect(!block_has_tie(b, rule), 1)) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      v[j] = masked_value<false>(first_draw_keeps(b, j, rule), v[j], consts);
  } else {  // the whole rule, recomputed: sharing nothing keeps it off the common path
    mask_bits(keep_bits8(stream, rule, g), consts, v);
  }
}

// The keep bits of every element of row r under a per-sample mask: all or none, by the draw of
// the row's sample (rows_per_sample rows a sample).
__device__ __forceinline__ uint32_t sample_bits(const PhiloxStream& stream, const KeepRule& rule,
                                                int64_t r, int64_t rows_per_sample) {
  const uint64_t m = static_cast<uint64_t>(r / rows_per_sample);
  const uint32_t bit = keep_bits8(stream, rule, m / kMaskPerCall) >> (m % kMaskPerCall);
  return (bit & 1u) != 0 ? 0xFFu : 0u;
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

// The lane's chunks of a row of n elements are first, first + stride, ... (first = g * 32 + t,
// stride = G * 32; a row's last stripe may end before the lane's chunk). `groups` is the
// kernel parameter's G: read as a uniform operand, where s.groups (a register) made the bf16
// forward 0.2 instructions per element longer. How many the lane has (32-bit: a 64-bit
// division is a subroutine call):
__device__ __forceinline__ int lane_chunk_count(const RowSlot& s, int groups, int64_t n) {
  const int chunks = static_cast<int>((n + kChunk - 1) / kChunk);
  const int first = s.group * kLanes + s.lane, stride = groups * kLanes;
  return first < chunks ? (chunks - first + stride - 1) / stride : 0;
}
// and the first element of its k-th, in k's type (int for the register cache's short rows:
// 32-bit offsets make its forward 0.1-0.2 instructions per element shorter).
template <typename I>
__device__ __forceinline__ I lane_chunk_start(const RowSlot& s, int groups, I k) {
  return ((s.group + k * groups) * kLanes + s.lane) * I(kChunk);
}

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
  // how the mask is drawn: per element (p > 0), per sample (per_sample, p > 0), or not (p == 0)
  bool draws_each, draws_per_sample;
  at::PhiloxCudaState philox;
  int64_t* pair_out;
};

// One forward row: its operands from its first element, and how its chunks are masked.
template <DType D, bool kWide>
struct ForwardRow {
  using raw = typename Dev<D>::raw;
  using hraw = typename Dev<kWide ? DType::kFloat : D>::raw;
  const raw* x;
  const hraw* residual;  // or null
  hraw* h;               // or null
  raw* y;
  uint64_t m0;  // the mask index of its first element
  bool draw;    // a draw per element; else `bits` masks every chunk (p == 0, per_sample)
  uint32_t bits;

  __device__ static ForwardRow make(const NormForwardArgs& a, bool draws_each, int64_t r,
                                    uint32_t row_bits) {
    const int64_t at = r * a.cols;
    return {static_cast<const raw*>(a.input) + at,
            a.residual != nullptr ? static_cast<const hraw*>(a.residual) + at : nullptr,
            a.h != nullptr ? static_cast<hraw*>(a.h) + at : nullptr,
            static_cast<raw*>(a.y) + at,
            static_cast<uint64_t>(at),
            draws_each,
            row_bits};
  }
};

// The input's chunk at c0 of a row (v, in the compute type). kWhole: the row is whole chunks of
// 16-byte vectors (cols % 8 == 0, vec_rows, vec_cols), so a chunk is one counter group and
// needs no bounds.
template <DType D, bool kWide, bool kWhole, typename I>
__device__ __forceinline__ void chunk_x(const ForwardParams<typename Dev<D>::acc>& p,
                                        const ForwardRow<D, kWide>& row, I c0,
                                        typename Dev<D>::acc (&v)[kChunk]) {
  const int64_t n = p.a.cols;
  Chunk<typename Dev<D>::raw> x;
  load_chunk(row.x, c0, n, kWhole || (p.vec_rows && c0 + kChunk <= n), x);
  to_acc<D>(x, v);
}

// v += the input bias's chunk at c0.
template <DType D, bool kWhole, typename I>
__device__ __forceinline__ void add_input_bias(const ForwardParams<typename Dev<D>::acc>& p, I c0,
                                               typename Dev<D>::acc (&v)[kChunk]) {
  const int64_t n = p.a.cols;
  typename Dev<D>::acc input_bias[kChunk];
  load_present_columns<D>(p.a.input_bias, false, c0, n, kWhole || (p.vec_cols && c0 + kChunk <= n),
                          input_bias);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) v[j] = add_rn(v[j], input_bias[j]);
}

// h of the chunk at c0 of a row from v = input (+ input bias): masked, the residual added,
// rounded (hv: h as stored, in the compute type), stored if `store`. kNanLater: round_chunk's
// (the caller stores h again with store_h if the row has a NaN).
template <DType D, bool kWide, bool kWhole, bool kNanLater = false, typename I>
__device__ __forceinline__ void chunk_h_of(const ForwardParams<typename Dev<D>::acc>& p,
                                           const PhiloxStream& stream,
                                           const ForwardRow<D, kWide>& row, I c0, bool store,
                                           typename Dev<D>::acc (&v)[kChunk],
                                           typename Dev<D>::acc (&hv)[kChunk]) {
  constexpr DType H = kWide ? DType::kFloat : D;
  using hraw = typename Dev<H>::raw;
  using acc = typename Dev<D>::acc;
  const int64_t n = p.a.cols;
  const bool vector = kWhole || (p.vec_rows && c0 + kChunk <= n);
  Chunk<hraw> res;
  if (row.residual != nullptr) load_chunk(row.residual, c0, n, vector, res);
  const uint64_t m = row.m0 + static_cast<uint64_t>(c0);
  if (!row.draw) {
    mask_bits(row.bits, p.consts, v);
  } else if (kWhole) {
    mask_group(stream, p.rule, m / kMaskPerCall, p.consts, v);
  } else {
    mask_bits(chunk_keep(stream, p.rule, m), p.consts, v);
  }
  if (row.residual != nullptr) {
    acc r[kChunk];
    to_acc<H>(res, r);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = add_rn(v[j], r[j]);
  }
  Chunk<hraw> stored;
  round_chunk<H, kNanLater>(v, stored);
  to_acc<H>(stored, hv);  // stats and y from h as stored
  if (store && row.h != nullptr) store_chunk(row.h, c0, n, vector, stored);
}

// h stored again from hv, with its NaNs the core's (kNanLater's fix: rounding an h as stored
// gives its bits back).
template <DType D, bool kWide, typename I>
__device__ __forceinline__ void store_h(const ForwardParams<typename Dev<D>::acc>& p,
                                        const ForwardRow<D, kWide>& row, I c0,
                                        const typename Dev<D>::acc (&hv)[kChunk]) {
  constexpr DType H = kWide ? DType::kFloat : D;
  Chunk<typename Dev<H>::raw> stored;
  round_chunk<H>(hv, stored);
  store_chunk(row.h, c0, p.a.cols, true, stored);
}

// The three in one, for a chunk at a time.
template <DType D, bool kWide, bool kWhole, typename I>
__device__ __forceinline__ void chunk_h(const ForwardParams<typename Dev<D>::acc>& p,
                                        const PhiloxStream& stream, const ForwardRow<D, kWide>& row,
                                        I c0, bool store, typename Dev<D>::acc (&hv)[kChunk]) {
  typename Dev<D>::acc v[kChunk];
  chunk_x<D, kWide, kWhole>(p, row, c0, v);
  if (p.a.input_bias != nullptr) add_input_bias<D, kWhole>(p, c0, v);
  chunk_h_of<D, kWide, kWhole>(p, stream, row, c0, store, v, hv);
}

// y of the chunk at c0 of a row from its deviations (core/norm.h's deviation: h - mean, or h):
// normalized(h) * weight + bias, with normalized(h) == mul_rn(deviation(h), rstd). An absent
// weight or bias is skipped: the CPU's neutral 1 and -0 leave every value as it is.
template <DType D, bool kWide, bool kWhole, typename I>
__device__ __forceinline__ void chunk_y(const ForwardParams<typename Dev<D>::acc>& p,
                                        const ForwardRow<D, kWide>& row, I c0,
                                        const typename Dev<D>::acc (&dev)[kChunk],
                                        typename Dev<D>::acc rstd) {
  using S = Dev<D>;
  using acc = typename S::acc;
  const NormForwardArgs& a = p.a;
  const int64_t n = a.cols;
  const bool vec_cols = kWhole || (p.vec_cols && c0 + kChunk <= n);
  acc weight[kChunk], bias[kChunk], out[kChunk];
  if (a.weight != nullptr)
    load_present_columns<D>(a.weight, a.weight_fp32, c0, n, vec_cols, weight);
  if (a.bias != nullptr) load_present_columns<D>(a.bias, a.weight_fp32, c0, n, vec_cols, bias);
  const auto affine = [&](auto has_weight, auto has_bias) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      out[j] = affine_out<decltype(has_weight)::value, decltype(has_bias)::value>(
          mul_rn(dev[j], rstd), weight[j], bias[j]);
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (a.weight != nullptr) {
    a.bias != nullptr ? affine(yes(), yes()) : affine(yes(), no());
  } else {
    a.bias != nullptr ? affine(no(), yes()) : affine(no(), no());
  }
  Chunk<typename S::raw> y;
  round_chunk<D>(out, y);
  store_chunk(row.y, c0, n, kWhole || (p.vec_rows && c0 + kChunk <= n), y);
}

// The deviations of a chunk's h from the row's mean (core/norm.h's deviation), in place.
template <bool kRms, typename acc>
__device__ __forceinline__ void to_deviations(acc (&hv)[kChunk], acc mean) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) hv[j] = deviation<kRms>(hv[j], mean);
}

// Adds the chunk's elements below n (v, or with kSquare its square) into the lane's
// accumulators; kWhole: every element is below n.
template <bool kSquare, bool kWhole, typename acc>
__device__ __forceinline__ void accumulate(acc (&a)[kChunk], const acc (&v)[kChunk], int64_t c0,
                                           int64_t n) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (kWhole || c0 + j < n) a[j] = add_rn(a[j], kSquare ? mul_rn(v[j], v[j]) : v[j]);
  }
}

// kCache > 0: the row's h kept in registers (rows of whole chunks, up to G * kStripe * kCache
// elements); kCache == 0: any row, h recomputed in each sweep.
template <DType D, bool kWide, bool kRms, int kCacheChunks>
__global__ void __launch_bounds__(kThreads, kCacheChunks > 0 || D == DType::kDouble ? 1 : 2)
    norm_forward_kernel(const ForwardParams<typename Dev<D>::acc> p) {
  using acc = typename Dev<D>::acc;
  const NormForwardArgs& a = p.a;
  const PhiloxStream stream = kernel_stream(p.philox, nullptr, p.pair_out);
  const RowSlot s = RowSlot::make(p.groups);
  const int64_t n = a.cols;
  const int rows_per_block = kWarps / p.groups;
  const int lane_chunks = lane_chunk_count(s, p.groups, n);
  for (int64_t base = int64_t(blockIdx.x) * rows_per_block; base < a.rows;
       base += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = base + s.slot;
    const bool live = r < a.rows;
    const int own = live ? lane_chunks : 0;  // a slot past the last row joins the trees with zeros
    uint32_t row_bits = 0xFFu;               // p == 0: every element kept
    if (p.draws_per_sample && live) row_bits = sample_bits(stream, p.rule, r, a.rows_per_sample);
    const ForwardRow<D, kWide> row =
        ForwardRow<D, kWide>::make(a, p.draws_each, live ? r : 0, row_bits);
    RowStats<acc> stats{acc(0), acc(0)};
    acc sums[kChunk];
    if constexpr (kCacheChunks > 0) {  // rows of whole chunks (the launcher's choice)
      acc hv[kCacheChunks][kChunk];
      zero(sums);
      // The inputs first, then the input bias over them all: one test of it per row (per
      // chunk, it was predicated: issued whether or not there is one)
#pragma unroll
      for (int k = 0; k < kCacheChunks; ++k) {
        if (k == own) break;  // one test past the lane's last chunk, not one per absent chunk
        chunk_x<D, kWide, true>(p, row, lane_chunk_start(s, p.groups, k), hv[k]);
      }
      if (a.input_bias != nullptr) {
#pragma unroll
        for (int k = 0; k < kCacheChunks; ++k) {
          if (k == own) break;
          add_input_bias<D, true>(p, lane_chunk_start(s, p.groups, k), hv[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kCacheChunks; ++k) {
        if (k == own) break;
        // a NaN h is fixed below: one test a row, not one a chunk
        chunk_h_of<D, kWide, true, true>(p, stream, row, lane_chunk_start(s, p.groups, k), true,
                                         hv[k], hv[k]);
        accumulate<false, true>(sums, hv[k], 0, n);
      }
      // A NaN h makes its accumulator NaN: then the lane stores its h again, the NaNs fixed (an
      // Inf and a -Inf make a NaN too: h is stored again unchanged). Only bf16 fixes NaNs.
      if constexpr (D == DType::kBFloat16 && !kWide) {
        bool nan = false;
#pragma unroll
        for (int j = 0; j < kChunk; ++j) nan |= sums[j] != sums[j];
        if (__builtin_expect(nan, 0) && row.h != nullptr) {
#pragma unroll
          for (int k = 0; k < kCacheChunks; ++k) {
            if (k == own) break;
            store_h<D, kWide>(p, row, lane_chunk_start(s, p.groups, k), hv[k]);  // hv: h as stored
          }
        }
      }
      if (!kRms) stats.mean = row_mean(row_total(sums, s), n);
      // hv becomes the deviations, which y reuses; RMSNorm's are h itself
      zero(sums);
#pragma unroll
      for (int k = 0; k < kCacheChunks; ++k) {
        if (k == own) break;
        to_deviations<kRms>(hv[k], stats.mean);
        accumulate<true, true>(sums, hv[k], 0, n);
      }
      stats.rstd = row_rstd(row_total(sums, s), n, p.eps);
#pragma unroll
      for (int k = 0; k < kCacheChunks; ++k) {
        if (k == own) break;
        chunk_y<D, kWide, true>(p, row, lane_chunk_start(s, p.groups, k), hv[k], stats.rstd);
      }
    } else {
      acc hv[kChunk];
      if (!kRms) {
        zero(sums);
#pragma unroll 1
        for (int k = 0; k < own; ++k) {
          const int64_t c0 = lane_chunk_start(s, p.groups, int64_t(k));
          chunk_h<D, kWide, false>(p, stream, row, c0, true, hv);
          accumulate<false, false>(sums, hv, c0, n);
        }
        stats.mean = row_mean(row_total(sums, s), n);
      }
      zero(sums);
#pragma unroll 1
      for (int k = 0; k < own; ++k) {
        const int64_t c0 = lane_chunk_start(s, p.groups, int64_t(k));
        chunk_h<D, kWide, false>(p, stream, row, c0, kRms, hv);
        to_deviations<kRms>(hv, stats.mean);
        accumulate<true, false>(sums, hv, c0, n);
      }
      stats.rstd = row_rstd(row_total(sums, s), n, p.eps);
#pragma unroll 1
      for (int k = 0; k < own; ++k) {
        const int64_t c0 = lane_chunk_start(s, p.groups, int64_t(k));
        chunk_h<D, kWide, false>(p, stream, row, c0, false, hv);
        to_deviations<kRms>(hv, stats.mean);
        chunk_y<D, kWide, false>(p, row, c0, hv, stats.rstd);
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
  bool draws_each, draws_per_sample;  // as ForwardParams's
  bool whole_groups;                  // cols % 8 == 0: a chunk is one counter group (mask_group)
  acc* partial[3];  // the slabs [row_blocks][cols] of grad_weight, grad_bias, grad_input_bias
  const int64_t* pair_in;
};

// The weight's chunk at c0 (1 where absent) and, for xhat from y, the bias's (0 where absent).
template <typename acc>
struct GradColumns {
  acc weight[kChunk], bias[kChunk];
};
// whole: a row of whole chunks with aligned columns (kVector), so a 16-byte vector load.
template <DType D>
__device__ __forceinline__ void load_grad_columns(const BackwardParams<typename Dev<D>::acc>& p,
                                                  int64_t c0, bool whole,
                                                  GradColumns<typename Dev<D>::acc>& cols) {
  using acc = typename Dev<D>::acc;
  const NormBackwardArgs& a = p.a;
  const bool vec_cols = whole || (p.vec_cols && c0 + kChunk <= a.cols);
  load_columns<D>(a.weight, a.weight_fp32, c0, a.cols, vec_cols, acc(1), cols.weight);
  if (a.saved_is_y) load_columns<D>(a.bias, a.weight_fp32, c0, a.cols, vec_cols, acc(0), cols.bias);
}

// xhat, dy and g = dy * weight of the chunk at c0 of the row whose first element is `at`
// (vector: the chunk's rows are read as 16-byte vectors, load_chunk).
template <DType D, bool kWide, bool kRms>
__device__ __forceinline__ void chunk_grad_inputs(const BackwardParams<typename Dev<D>::acc>& p,
                                                  int64_t at, int64_t c0, bool vector,
                                                  const RowStats<typename Dev<D>::acc>& stats,
                                                  const GradColumns<typename Dev<D>::acc>& cols,
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
  if (a.saved_is_y) {
    Chunk<raw> y;
    load_chunk(static_cast<const raw*>(a.saved) + at, c0, n, vector, y);
    acc yv[kChunk];
    to_acc<D>(y, yv);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) xhat[j] = xhat_from_y(yv[j], cols.weight[j], cols.bias[j]);
  } else {
    Chunk<hraw> h;
    load_chunk(static_cast<const hraw*>(a.saved) + at, c0, n, vector, h);
    acc hv[kChunk];
    to_acc<kWide ? DType::kFloat : D>(h, hv);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) xhat[j] = normalized<kRms>(hv[j], stats);
  }
  Chunk<raw> d;
  load_chunk(static_cast<const raw*>(a.dy) + at, c0, n, vector, d);
  to_acc<D>(d, dy);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) g[j] = mul_rn(dy[j], cols.weight[j]);
}

template <typename acc>
__device__ __forceinline__ RowStats<acc> saved_stats(const NormBackwardArgs& a, bool rms,
                                                     int64_t r) {
  return {rms || a.saved_is_y ? acc(0) : static_cast<const acc*>(a.mean)[r],
          static_cast<const acc*>(a.rstd)[r]};
}

// A block per block of kRowBlock rows (grid-stride): the rows' c1, c2 (kWarps / G rows at a
// time), then per chunk the rows in order: gradients, and the block's column partials.
// kVector: rows of whole 16-byte chunks (cols % 8 == 0, vec_rows, vec_cols), known at compile
// time so that no load or store of either pass is a branch. Its variants fit 128 registers (2
// blocks an SM) but fp64's; the others may take more (given 128, fp32 spilled on sm_80).
template <DType D, bool kWide, bool kRms, bool kVector>
__global__ void __launch_bounds__(kThreads, kVector&& D != DType::kDouble ? 2 : 1)
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
  const int own = lane_chunk_count(s, p.groups, n);
  const int64_t blocks = row_blocks(a.rows);
  const int thread = static_cast<int>(threadIdx.y) * kLanes + static_cast<int>(threadIdx.x);
  // the block's rows' constants and statistics, for the second pass: one 16-byte (fp32) load a row
  struct alignas(4 * sizeof(acc)) RowConsts {
    acc c1, c2, mean, rstd;
  };
  __shared__ RowConsts consts[kRowBlock];
  // the rows' keep bits when they are not drawn per element: per sample, or all (p == 0)
  __shared__ uint32_t row_bits[kRowBlock];
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
      RowStats<acc> stats{acc(0), acc(0)};
      if (live) {
        stats = saved_stats<acc>(a, kRms, r);
        for (int k = 0; k < own; ++k) {
          const int64_t c0 = lane_chunk_start(s, p.groups, k);
          GradColumns<acc> cols;
          load_grad_columns<D>(p, c0, kVector, cols);
          acc xhat[kChunk], dy[kChunk], g[kChunk];
          const bool vector = kVector || (p.vec_rows && c0 + kChunk <= n);
          chunk_grad_inputs<D, kWide, kRms>(p, r * n, c0, vector, stats, cols, xhat, dy, g);
          const auto add = [&](int j) {
            sum_gx[j] = add_rn(sum_gx[j], mul_rn(g[j], xhat[j]));
            sum_g[j] = add_rn(sum_g[j], g[j]);
          };
          if (kVector || p.whole_groups) {  // whole chunks (cols % 8 == 0): no bound per element
#pragma unroll
            for (int j = 0; j < kChunk; ++j) add(j);
          } else {
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              if (c0 + j < n) add(j);
            }
          }
        }
      }
      const acc total_gx = row_total(sum_gx, s);
      const acc total_g = row_total(sum_g, s);
      if (live && s.group == 0 && s.lane == 0) {
        consts[i] = {row_mean(total_gx, n), kRms ? acc(0) : row_mean(total_g, n), stats.mean,
                     stats.rstd};
        row_bits[i] =
            p.draws_per_sample ? sample_bits(stream, p.rule, r, a.rows_per_sample) : 0xFFu;
      }
    }
    __syncthreads();
    for (int64_t c0 = int64_t(thread) * kChunk; c0 < n; c0 += int64_t(kThreads) * kChunk) {
      const bool vector = kVector || (p.vec_rows && c0 + kChunk <= n);
      acc part[3][kChunk];
      zero(part[0]);
      zero(part[1]);
      zero(part[2]);
      GradColumns<acc> cols;  // the same for every row of the block
      load_grad_columns<D>(p, c0, kVector, cols);
      int64_t at = r0 * n;  // the row's first element
      for (int i = 0; i < in_block; ++i, at += n) {
        const RowConsts row = consts[i];
        const RowStats<acc> stats{row.mean, row.rstd};
        acc xhat[kChunk], dy[kChunk], g[kChunk];
        chunk_grad_inputs<D, kWide, kRms>(p, at, c0, vector, stats, cols, xhat, dy, g);
        Chunk<hraw> dh_in, grad_h;
        if (a.dh_in != nullptr) {
          load_chunk(static_cast<const hraw*>(a.dh_in) + at, c0, n, vector, dh_in);
        }
        acc dh[kChunk], dxv[kChunk];
#pragma unroll
        for (int j = 0; j < kChunk; ++j)
          dh[j] = h_gradient<kRms>(g[j], xhat[j], stats.rstd, row.c1, row.c2);
        if (a.dh_in != nullptr) {
          acc d[kChunk];
          to_acc<kWide ? DType::kFloat : D>(dh_in, d);
#pragma unroll
          for (int j = 0; j < kChunk; ++j) dh[j] = add_rn(dh[j], d[j]);
        }
#pragma unroll
        for (int j = 0; j < kChunk; ++j) dxv[j] = dh[j];
        const uint64_t m = static_cast<uint64_t>(at + c0);
        if (p.draws_each && p.whole_groups) {
          mask_group(stream, p.rule, m / kMaskPerCall, p.consts, dxv);
        } else if (p.draws_each) {
          mask_bits(chunk_keep(stream, p.rule, m), p.consts, dxv);
        } else {
          mask_bits(row_bits[i], p.consts, dxv);  // drawn once a row by the first pass
        }
        Chunk<raw> dx;
        if (a.grad_h != nullptr) round_chunk<kWide ? DType::kFloat : D>(dh, grad_h);
        round_chunk<D>(dxv, dx);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          part[0][j] = add_rn(part[0][j], mul_rn(dy[j], xhat[j]));
          part[1][j] = add_rn(part[1][j], dy[j]);
        }
        if (p.partial[2] != nullptr) {  // the input bias's: the input's gradient as stored
          acc dxs[kChunk];
          to_acc<D>(dx, dxs);
#pragma unroll
          for (int j = 0; j < kChunk; ++j) part[2][j] = add_rn(part[2][j], dxs[j]);
        }
        if (a.grad_h != nullptr) {
          store_chunk(static_cast<hraw*>(a.grad_h) + at, c0, n, vector, grad_h);
        }
        store_chunk(static_cast<raw*>(a.grad_input) + at, c0, n, vector, dx);
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
    __syncthreads();  // c1, c2 and the statistics are the next block's
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
  p.draws_each = !a.affine.keep_all && a.rows_per_sample == 0;
  p.draws_per_sample = !a.affine.keep_all && a.rows_per_sample > 0;
  p.philox = philox;
  p.pair_out = pair_out;
  const dim3 block(kLanes, kWarps);
  const int64_t rows_per_block = kWarps / p.groups;
  // the register cache takes rows of whole 16-byte chunks (every common hidden size); any other
  // row is swept
  const bool whole = a.cols % kChunk == 0 && p.vec_rows && p.vec_cols;
  if (whole && a.cols <= int64_t(p.groups) * kStripe * kCache<D>) {
    constexpr auto kernel = norm_forward_kernel<D, kWide, kRms, kCache<D>>;
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
    p.draws_each = !a.affine.keep_all && a.rows_per_sample == 0;
    p.draws_per_sample = !a.affine.keep_all && a.rows_per_sample > 0;
    p.whole_groups = a.cols % kChunk == 0;
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
    if (p.vec_rows && p.vec_cols && p.whole_groups) {
      constexpr auto kernel = norm_backward_kernel<D, kWide, kRms, true>;
      kernel<<<launch::grid_for<kernel, kThreads>(blocks, 1), dim3(kLanes, kWarps), 0, stream>>>(p);
    } else {
      constexpr auto kernel = norm_backward_kernel<D, kWide, kRms, false>;
      kernel<<<launch::grid_for<kernel, kThreads>(blocks, 1), dim3(kLanes, kWarps), 0, stream>>>(p);
    }
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
