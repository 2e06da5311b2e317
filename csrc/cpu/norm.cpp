// CPU loops of the fused dropout + residual add + norm: parallel_for over rows (forward)
// and over the column sums' blocks of rows (backward), calling core/norm.h's arithmetic and
// summing in the contract's order (core/norm.h): stripes of 256 consecutive elements added
// into a 256-wide accumulator per group, then the fixed tree.
#include "cpu/norm.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/keep_bits.h"
#include "cpu/vec.h"

namespace fused_dropout {
namespace FD_CPU_NS {  // a kernel file (cpu/capability.h): compiled once per CPU capability
namespace {

// Work per parallel task; below this the call runs inline on one thread.
constexpr int64_t kGrainElements = 1 << 15;

// How a dtype is stored and converted on the CPU; fp16 and bf16 through the core's bit-level
// conversions (which the compiler vectorizes).
template <DType D>
struct Stored;
template <>
struct Stored<DType::kFloat> {
  using raw = float;
  using acc = float;
  static acc load(raw v) { return v; }
  static raw store(acc v) { return v; }
};
template <>
struct Stored<DType::kDouble> {
  using raw = double;
  using acc = double;
  static acc load(raw v) { return v; }
  static raw store(acc v) { return v; }
};
template <>
struct Stored<DType::kHalf> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return half_bits_to_float(v); }
  static raw store(acc v) { return float_to_half_bits(v); }
};
template <>
struct Stored<DType::kBFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return bf16_bits_to_float(v); }
  static raw store(acc v) { return float_to_bf16_bits(v); }
};

// The contract's row sum from its stripe accumulators (`groups` x kStripe): each lane's 8
// accumulators (chunk_tree), then the 32 lanes, then the groups (halving_tree; core/norm.h).
double lane_tree(const double* stripe) {
  double lanes[kLanes];
  for (int t = 0; t < kLanes; ++t) {
    lanes[t] = chunk_tree(*reinterpret_cast<const double (*)[kChunk]>(stripe + t * kChunk));
  }
  return halving_tree(lanes, kLanes);
}

#if defined(__AVX2__)
// The same tree on 8 lanes at a time, each add the scalar tree's (same operands, same order:
// IEEE adds, so the same bits). As scalar code a row's trees were about 8% of the fp32
// forward's instructions at hidden 768 (cachegrind).
float lane_tree(const float* stripe) {
  __m256 lanes[kLanes / 8];
  for (int q = 0; q < kLanes / 8; ++q) {
    const float* a = stripe + q * 8 * kChunk;  // lanes 8q .. 8q + 7, one __m256 each
    __m256 b[4];  // j + 4: lanes (2i, 2i + 1) as [b_2i[0..3] | b_2i+1[0..3]]
    for (int i = 0; i < 4; ++i) {
      const __m256 v0 = _mm256_loadu_ps(a + 2 * i * kChunk);
      const __m256 v1 = _mm256_loadu_ps(a + (2 * i + 1) * kChunk);
      b[i] =
          _mm256_add_ps(_mm256_permute2f128_ps(v0, v1, 0x20), _mm256_permute2f128_ps(v0, v1, 0x31));
    }
    __m256 c[2];  // j + 2: [c_4i, c_4i+2 | c_4i+1, c_4i+3], two values each
    for (int i = 0; i < 2; ++i) {
      const __m256d lo = _mm256_castps_pd(b[2 * i]), hi = _mm256_castps_pd(b[2 * i + 1]);
      c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(lo, hi)),
                           _mm256_castpd_ps(_mm256_unpackhi_pd(lo, hi)));
    }
    // j + 1: even + odd halves give [d0, d2, d4, d6 | d1, d3, d5, d7]; lane order restored.
    const __m256 d = _mm256_add_ps(_mm256_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    lanes[q] = _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  // The halving tree of the 32 lanes: t + 16, t + 8, then within a vector t + 4, + 2, + 1.
  const __m256 l8 =
      _mm256_add_ps(_mm256_add_ps(lanes[0], lanes[2]), _mm256_add_ps(lanes[1], lanes[3]));
  const __m128 l4 = _mm_add_ps(_mm256_castps256_ps128(l8), _mm256_extractf128_ps(l8, 1));
  const __m128 l2 = _mm_add_ps(l4, _mm_movehl_ps(l4, l4));
  return _mm_cvtss_f32(_mm_add_ss(l2, _mm_movehdup_ps(l2)));
}
#else
float lane_tree(const float* stripe) {
  float lanes[kLanes];
  for (int t = 0; t < kLanes; ++t) {
    lanes[t] = chunk_tree(*reinterpret_cast<const float (*)[kChunk]>(stripe + t * kChunk));
  }
  return halving_tree(lanes, kLanes);
}
#endif

template <typename acc_t>
acc_t stripe_tree(const acc_t* acc, int groups) {
  acc_t per_group[kMaxGroups];
  for (int g = 0; g < groups; ++g) per_group[g] = lane_tree(acc + g * kStripe);
  return halving_tree(per_group, groups);
}

// The keep flags of row r: element-wise (mask indices r * cols ..) or one per sample.
void row_keep(KeepRange& range, int64_t r, int64_t cols, int64_t rows_per_sample, uint8_t* keep) {
  if (rows_per_sample > 0) {
    range.flags(r / rows_per_sample, 1, keep);
    std::fill(keep + 1, keep + cols, keep[0]);
  } else {
    range.flags(r * cols, cols, keep);
  }
}

// A [cols] vector of the call (weight, bias, input_bias) in the compute type, or `neutral`
// where it is absent: 1 for a weight, -0 for a bias (x * 1 and x + -0 are x, bit for bit).
template <typename acc_t, DType D>
Vector<acc_t> row_vector(const void* p, bool fp32, int64_t cols, acc_t neutral) {
  Vector<acc_t> out(cols, neutral);
  if (p == nullptr) return out;
  for (int64_t c = 0; c < cols; ++c) {
    out[c] = fp32 ? static_cast<acc_t>(static_cast<const float*>(p)[c])
                  : static_cast<acc_t>(
                        Stored<D>::load(static_cast<const typename Stored<D>::raw*>(p)[c]));
  }
  return out;
}

// A compiled variant: the dtype, h in fp32 (residual_in_fp32), RMSNorm.
template <DType D, bool kWide, bool kRms>
struct Variant {};

// fn(Variant<...>{}) for the call's dtype and flags (wide only for the 16-bit dtypes).
template <typename Fn>
void dispatch(DType dtype, bool wide, bool rms, Fn&& fn) {
  const auto by_flags = [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    if constexpr (D == DType::kHalf || D == DType::kBFloat16) {
      if (wide) return rms ? fn(Variant<D, true, true>{}) : fn(Variant<D, true, false>{});
    }
    return rms ? fn(Variant<D, false, true>{}) : fn(Variant<D, false, false>{});
  };
  switch (dtype) {
    case DType::kFloat:
      return by_flags(std::integral_constant<DType, DType::kFloat>{});
    case DType::kDouble:
      return by_flags(std::integral_constant<DType, DType::kDouble>{});
    case DType::kHalf:
      return by_flags(std::integral_constant<DType, DType::kHalf>{});
    case DType::kBFloat16:
      return by_flags(std::integral_constant<DType, DType::kBFloat16>{});
  }
}

#ifdef FD_CPU_BLOCK_KERNEL
// The vector path of the forward and backward: fp32 and bf16 rows of a multiple of 64
// elements, with the keep bits as masks straight from the Philox words (no keep bytes) and
// the contract's stripe accumulators as whole vectors. The same operations in the same order
// as the scalar sweeps of forward_typed and backward_typed (each lane is one column), so the
// same bits.
template <DType D>
constexpr bool kVectorRows = D == DType::kFloat || D == DType::kBFloat16;
constexpr int64_t kVectorRowMultiple = 64;  // one word of keep bits

// How the forward writes h: not at all (no h kept), or with plain or non-temporal stores.
enum class HStore { kNone, kPlain, kStream };

// Where sweeps 2 and 3 of the forward read h back from. With AVX-512, in h's own dtype: from
// h itself where it is stored plainly (still in cache), else from a scratch row, which h's
// streaming stores leave out of the caches. A 512-bit load or store takes two of a Zen 4's
// load/store slots and this forward waits on them: against an fp32 copy of every row, a store
// fewer per vector and half the bytes loaded for bf16 (bf16 forward at BERT size, 1 thread:
// 1,940 -> 1,830 us). With AVX2, from an fp32 copy: its bf16 loads take two instructions,
// and reading h's dtype back made its bf16 forward 3-10% slower (timed on a Zen 4).
#if defined(FD_CPU_AVX512)
constexpr bool kReadHInPlace = true;
#else
constexpr bool kReadHInPlace = false;
#endif

// The call's operands for the vector path: [cols] vectors in fp32 (weight and bias neutral
// where absent).
struct VectorRowArgs {
  const float* weight;
  const float* bias;
  const uint32_t* weight_bias;  // the two as bf16_pairs, or null
  const float* input_bias;      // or null
  void* h_scratch;              // a row: h as stored, where sweeps 2 and 3 read it back
  float* sum;                   // scratch: groups x kStripe accumulators
  bool stream_y;                // y with non-temporal stores (stream_vec)
};

// The weight and bias as bf16 pairs (the weight in the low half of each word), where every
// value of both is exactly a bf16 (bf16 weights, or absent ones); else empty. Sweep 3 then
// loads one vector for the two: a 512-bit load takes two of a Zen 4's load slots, and the
// forward waits on them (bf16 forward at BERT size, 1 thread: 4% faster). Made for bf16
// inputs on the AVX-512 paths only: fp32 weights are seldom bf16 values, and AVX2's 256-bit
// loads take one slot.
#if defined(FD_CPU_AVX512)
Vector<uint32_t> bf16_pairs(const Vector<float>& weight, const Vector<float>& bias) {
  Vector<uint32_t> pairs(weight.size());
  for (size_t c = 0; c < weight.size(); ++c) {
    uint32_t w, b;
    std::memcpy(&w, &weight[c], sizeof(w));
    std::memcpy(&b, &bias[c], sizeof(b));
    if ((w | b) & 0xFFFFu) return {};
    pairs[c] = w >> 16 | b;
  }
  return pairs;
}
#endif

// Outputs larger than this (y, h; the backward's grad_input and grad_h together) are written
// past the caches: else each line would be read before it is written, and evicted anyway.
// Measured on a Zen 4 at BERT size (8x512x768, 2 threads), against our unfused composition:
// forward fp32 (12 MiB of y) 1.04-1.40x with plain stores, 1.23-1.48x with streaming ones
// (medians of 60 calls, five runs each); bf16 (6 MiB of y) 1.01-1.20x either way. h too
// (fp32, y streamed, the heap kept as bench/ keeps it): 0.89-1.00x plain, 1.18-1.24x
// streaming (paired medians of 41, two runs each); bf16 0.88-0.92x either way. Backward
// (minimums of 100 calls; three runs, two for bf16): fp32 (25 MiB out) 0.77-0.83x plain,
// 0.93-1.07x streaming; bf16 (12 MiB out) 1.15-1.16x plain, 1.10-1.12x streaming (noise).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// A row's keep bits, 64 per 64 columns (its sample's flag for every column with a
// per-sample mask), drawn ahead of the sweep that uses them in a sweep that waits on memory
// anyway: Philox's multiplies then run under the loads or the streaming stores instead of
// between them.
class RowKeepWords {
 public:
  RowKeepWords(const LaneStream& stream, const MaskedAffine& affine, KeepRange& samples,
               int64_t cols, int64_t rows_per_sample)
      : words_(stream, affine),
        samples_(samples),
        cols_(cols),
        rows_per_sample_(rows_per_sample),
        row_(rows_per_sample > 0 ? 0 : cols / kVectorRowMultiple) {}

  // Draws the bits of columns c .. c + 63 of row r (c a multiple of 64, in order from 0).
  void draw(int64_t r, int64_t c) {
    if (rows_per_sample_ == 0) {
      row_[c / kVectorRowMultiple] = words_.at(r * cols_ + c);
    } else if (c == 0) {
      uint8_t keep;
      samples_.flags(r / rows_per_sample_, 1, &keep);
      sample_ = keep ? ~uint64_t(0) : 0;
    }
  }
  void draw_row(int64_t r) {
    for (int64_t c = 0; c < cols_; c += kVectorRowMultiple) draw(r, c);
  }
  // The bits of columns c .. c + 63 of the row drawn last.
  uint64_t get(int64_t c) const {
    return rows_per_sample_ == 0 ? row_[c / kVectorRowMultiple] : sample_;
  }

 private:
  KeepWords words_;
  KeepRange& samples_;
  const int64_t cols_, rows_per_sample_;
  Vector<uint64_t> row_;
  uint64_t sample_ = 0;
};

#if defined(FD_CPU_AVX512)
// One group's stripe accumulators as 16 registers: acc[q] holds lanes 2q and 2q + 1 (columns
// 16q .. 16q + 15 of the stripe). Every index below is a constant (no loops), so that GCC
// keeps the array in registers (with loops it was zeroed with rep stos and summed from the
// stack, each sweep).
using StripeRegs = FVec[kStripe / kVecLanes];

// acc[Q] += value(s0 + 16Q) for Q < vectors, in order of Q.
template <typename Value, size_t... Q>
FD_ALWAYS_INLINE void add_stripe(StripeRegs& acc, int64_t s0, int64_t vectors, Value& value,
                                 std::index_sequence<Q...>) {
  ((Q < static_cast<size_t>(vectors) ? void(acc[Q] = add_vec(acc[Q], value(s0 + Q * kVecLanes)))
                                     : void()),
   ...);
}

// lane_tree on the registers: each add is the scalar tree's (same operands, same order),
// on 16 values at once.
FD_ALWAYS_INLINE float lane_tree(const StripeRegs& acc) {
  // j + 4: a lane's a0..a3 and a4..a7 are 128-bit blocks; j4(acc[q], acc[q + 8]) holds lanes
  // 2q, 2q + 1, 2q + 16, 2q + 17, four values each.
  const auto j4 = [](FVec u, FVec v) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(u, v, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u, v, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const FVec b0 = j4(acc[0], acc[8]), b1 = j4(acc[1], acc[9]), b2 = j4(acc[2], acc[10]),
             b3 = j4(acc[3], acc[11]), b4 = j4(acc[4], acc[12]), b5 = j4(acc[5], acc[13]),
             b6 = j4(acc[6], acc[14]), b7 = j4(acc[7], acc[15]);
  // j + 2: block k of j2(u, v) holds two values of block k's lane of u, then of v's.
  const auto j2 = [](FVec u, FVec v) {
    return _mm512_add_ps(_mm512_shuffle_ps(u, v, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u, v, _MM_SHUFFLE(3, 2, 3, 2)));
  };
  const FVec c0 = j2(b0, b4), c1 = j2(b1, b5), c2 = j2(b2, b6), c3 = j2(b3, b7);
  // j + 1: the lane sums; d0's blocks hold lanes [0 8 4 12] [1 9 5 13] [16 24 20 28]
  // [17 25 21 29], d1's the same plus 2.
  const auto j1 = [](FVec u, FVec v) {
    return _mm512_add_ps(_mm512_shuffle_ps(u, v, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(u, v, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const FVec d0 = j1(c0, c2), d1 = j1(c1, c3);
  // The halving tree of the 32 lanes. t + 16: e = [0 8 4 12] [1 9 5 13] [2 10 6 14] [3 11 7 15].
  const FVec e = _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 2, 3, 2)));
  // t + 8 (neighbours), t + 4 (two apart): block k's first value is then lane k's.
  const FVec f = _mm512_add_ps(e, _mm512_permute_ps(e, _MM_SHUFFLE(2, 3, 0, 1)));
  const FVec g = _mm512_add_ps(f, _mm512_permute_ps(f, _MM_SHUFFLE(1, 0, 3, 2)));
  // t + 2 (blocks 0 + 2, 1 + 3), then t + 1.
  const FVec h = _mm512_add_ps(g, _mm512_shuffle_f32x4(g, g, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(_mm512_castps512_ps128(h), _mm512_extractf32x4_ps(h, 1)));
}
#endif

// The contract's row sum of value(c) (the vector of columns c .. c + kVecLanes - 1, called
// for every c of the row in order): added into the stripe accumulators (groups x kStripe,
// each starting at +0), then the fixed tree. With one group and AVX-512 the accumulators are
// 16 registers (a load and a store fewer per vector); else they live in the scratch `sum`.
template <typename Value>
FD_ALWAYS_INLINE float row_sum(float* __restrict sum, int64_t cols, int groups, Value&& value) {
  constexpr int kPerStripe = kStripe / kVecLanes;
  const FVec zero = splat(0.0f);
#if defined(FD_CPU_AVX512)
  if (groups == 1) {
    StripeRegs acc = {};  // +0
    for (int64_t s0 = 0; s0 < cols; s0 += kStripe) {
      add_stripe(acc, s0, std::min<int64_t>(kStripe, cols - s0) / kVecLanes, value,
                 std::make_index_sequence<kPerStripe>{});
    }
    return lane_tree(acc);
  }
#endif
  for (int64_t s0 = 0, s = 0; s0 < cols; s0 += kStripe, ++s) {
    float* __restrict stripe = sum + stripe_group(s, groups) * kStripe - s0;  // indexed by column
    const int64_t end = std::min(cols, s0 + kStripe);
    const bool first = s < groups;  // the group's first stripe: its accumulators start at +0
    for (int64_t c = s0; c < end; c += kVecLanes) {
      const FVec before = first ? zero : load_vec(stripe + c);
      store_vec(stripe + c, add_vec(before, value(c)));
    }
  }
  return stripe_tree(sum, groups);
}

template <bool kRms, bool kResidual, HStore kH, typename raw, typename hraw>
void forward_row_vector(const NormForwardArgs& a, const VectorRowArgs& v, int64_t r,
                        RowKeepWords& keep, bool draw_next) {
  const int64_t cols = a.cols;
  const int groups = norm_groups(cols);
  const raw* __restrict x = static_cast<const raw*>(a.input) + r * cols;
  const hraw* __restrict res =
      kResidual ? static_cast<const hraw*>(a.residual) + r * cols : nullptr;
  hraw* __restrict h = kH != HStore::kNone ? static_cast<hraw*>(a.h) + r * cols : nullptr;
  // h as stored, written by sweep 1 and read back by sweeps 2 and 3 (kReadHInPlace): from h
  // itself where it is stored plainly, else from the scratch row.
  using hread = std::conditional_t<kReadHInPlace, hraw, float>;
  hread* __restrict hs = kReadHInPlace && kH == HStore::kPlain ? reinterpret_cast<hread*>(h)
                                                               : static_cast<hread*>(v.h_scratch);
  float* __restrict sum = v.sum;
  const float* __restrict w = v.weight;
  const float* __restrict bias = v.bias;
  const float* __restrict input_bias = v.input_bias;
  const FVec scale = splat(AffineConsts<float>::make(a.affine).scale);
  constexpr uint32_t kLaneBits = (1u << kVecLanes) - 1;
  // Sweep 1: h, stored and kept as stored, added into S(h) or S(h^2).
  uint64_t bits = 0;  // the keep bits of columns c .. c + 63, shifted down as they are used
  const float h_sum = row_sum(sum, cols, groups, [&](int64_t c) FD_ALWAYS_INLINE_LAMBDA {
    if (c % kVectorRowMultiple == 0) bits = keep.get(c);
    FVec in = load_vec(x + c);
    if (input_bias) in = add_vec(in, load_vec(input_bias + c));
    FVec t = keep_mul(static_cast<uint32_t>(bits) & kLaneBits, in, scale);
    bits >>= kVecLanes;
    if constexpr (kResidual) t = add_vec(t, load_vec(res + c));
    if constexpr (!kReadHInPlace) {
      if constexpr (kH == HStore::kNone) t = round_for(h, t);
      if constexpr (kH != HStore::kNone) t = round_store<kH == HStore::kStream>(h + c, t);
      store_vec(hs + c, t);
    } else if constexpr (kH == HStore::kStream) {
      t = round_stream_copy(h + c, hs + c, t);
    } else {
      t = round_store<false>(hs + c, t);  // h itself, or the scratch row
    }
    return kRms ? mul_vec(t, t) : t;
  });
  const float eps = static_cast<float>(a.eps);
  RowStats<float> stats{0.0f, 0.0f};
  if constexpr (kRms) {
    stats.rstd = row_rstd(h_sum, cols, eps);
  } else {
    // Sweep 2: S((h - mean)^2).
    stats.mean = row_mean(h_sum, cols);
    const FVec mean = splat(stats.mean);
    const auto squared_deviation = [=](int64_t c) FD_ALWAYS_INLINE_LAMBDA {
      const FVec d = sub_vec(load_vec(hs + c), mean);
      return mul_vec(d, d);
    };
    stats.rstd = row_rstd(row_sum(sum, cols, groups, squared_deviation), cols, eps);
    static_cast<float*>(a.mean)[r] = stats.mean;
  }
  static_cast<float*>(a.rstd)[r] = stats.rstd;
  // Sweep 3: y = xhat * weight + bias.
  raw* __restrict y = static_cast<raw*>(a.y) + r * cols;
  const FVec mean = splat(stats.mean), rstd = splat(stats.rstd);
  // While this row's y is written: the next row's operands are asked for, so that the
  // first sweep finds them in cache instead of waiting on each line (BERT size, 2 threads,
  // minimums of 100 calls, against our unfused: fp32 1.10-1.28x without, 1.45-1.52x with;
  // bf16 1.03-1.10x, 1.15-1.17x), and (draw_next) its keep bits are drawn.
  const bool next = r + 1 < a.rows;
  // By 64 columns: the vector loop then has no call and no test in it.
  const auto sweep3 = [=, &keep](auto store, auto weight_bias_at) {
    for (int64_t c0 = 0; c0 < cols; c0 += kVectorRowMultiple) {
      if (next) {
        prefetch_lines(x + cols + c0, kVectorRowMultiple);
        if constexpr (kResidual) prefetch_lines(res + cols + c0, kVectorRowMultiple);
      }
      if (draw_next) keep.draw(r + 1, c0);
#pragma GCC unroll 4
      for (int64_t c = c0; c < c0 + kVectorRowMultiple; c += kVecLanes) {
        const FVec hv = load_vec(hs + c);
        const FVec xhat = mul_vec(kRms ? hv : sub_vec(hv, mean), rstd);
        FVec wv, bv;
        weight_bias_at(c, wv, bv);
        store(y + c, add_vec(mul_vec(xhat, wv), bv));
      }
    }
  };
  const uint32_t* __restrict pairs = v.weight_bias;
  const auto with_store = [&](auto store) {
#if defined(FD_CPU_AVX512)
    if constexpr (std::is_same_v<raw, uint16_t>) {  // bf16: the only dtype with pairs
      if (pairs) {
        return sweep3(store, [=](int64_t c, FVec& wv, FVec& bv)
                                 FD_ALWAYS_INLINE_LAMBDA { load_pairs(pairs + c, wv, bv); });
      }
    }
#endif
    sweep3(store, [=](int64_t c, FVec& wv, FVec& bv) FD_ALWAYS_INLINE_LAMBDA {
      wv = load_vec(w + c);
      bv = load_vec(bias + c);
    });
  };
  if (v.stream_y) {
    with_store([](raw* p, FVec out) { stream_vec(p, out); });
  } else {
    with_store([](raw* p, FVec out) { store_vec(p, out); });
  }
}

// The backward's operands for the vector path, in fp32 (neutral where absent), and the
// block's column partials (a scratch row for a sum that is not wanted).
struct VectorBackwardArgs {
  const float* weight;
  const float* bias;  // read only when xhat comes from y
  float* p_weight;    // the block's partial rows
  float* p_bias;
  float* p_input_bias;  // or null
  float* sum_gx;        // scratch: groups x kStripe accumulators each
  float* sum_g;
  bool stream;  // grad_input and grad_h with non-temporal stores
};

// One row of the backward (core/norm.h's formulas, as backward_typed's sweeps).
template <bool kRms, bool kFromY, bool kGradH, typename raw, typename hraw>
void backward_row_vector(const NormBackwardArgs& a, const VectorBackwardArgs& v, int64_t r,
                         RowKeepWords& keep) {
  const int64_t cols = a.cols;
  const int groups = norm_groups(cols);
  const raw* __restrict dy = static_cast<const raw*>(a.dy) + r * cols;
  const raw* __restrict y_saved = static_cast<const raw*>(a.saved) + r * cols;
  const hraw* __restrict h_saved = static_cast<const hraw*>(a.saved) + r * cols;
  const float* __restrict w = v.weight;
  const float* __restrict bias = v.bias;
  const FVec mean = splat(kRms || kFromY ? 0.0f : static_cast<const float*>(a.mean)[r]);
  const FVec rstd = splat(static_cast<const float*>(a.rstd)[r]);
  const auto xhat_at = [=](int64_t c) {
    if constexpr (kFromY) {
      return div_vec(sub_vec(load_vec(y_saved + c), load_vec(bias + c)), load_vec(w + c));
    } else {
      const FVec h = load_vec(h_saved + c);
      return mul_vec(kRms ? h : sub_vec(h, mean), rstd);
    }
  };
  // Sweep 1: S(g * xhat), S(g) and the column partials. Nothing but the row sums depends on
  // the order of the columns, so each vector of stripe accumulators (group g, columns q0 ..
  // q0 + kVecLanes - 1 of its stripes) is summed in registers over its stripes, in their
  // order, and stored once (not loaded and stored for each vector of the row).
  float* __restrict pw = v.p_weight;
  float* __restrict pb = v.p_bias;
  for (int g = 0; g < groups; ++g) {
    for (int64_t q0 = 0; q0 < kStripe; q0 += kVecLanes) {
      FVec gx_sum = splat(0.0f), g_sum = splat(0.0f);
      for (int64_t c = g * kStripe + q0; c < cols; c += groups * kStripe) {
        const FVec xh = xhat_at(c);
        const FVec d = load_vec(dy + c);
        const FVec gv = mul_vec(d, load_vec(w + c));
        gx_sum = add_vec(gx_sum, mul_vec(gv, xh));
        if constexpr (!kRms) g_sum = add_vec(g_sum, gv);
        store_vec(pw + c, add_vec(load_vec(pw + c), mul_vec(d, xh)));
        store_vec(pb + c, add_vec(load_vec(pb + c), d));
      }
      store_vec(v.sum_gx + g * kStripe + q0, gx_sum);
      store_vec(v.sum_g + g * kStripe + q0, g_sum);
    }
  }
  const FVec c1 = splat(row_mean(stripe_tree(v.sum_gx, groups), cols));
  const FVec c2 = splat(kRms ? 0.0f : row_mean(stripe_tree(v.sum_g, groups), cols));
  // Sweep 2: the gradients of h (+ the gradient into h itself) and of the input.
  const FVec scale = splat(AffineConsts<float>::make(a.affine).scale);
  const hraw* __restrict dh_in = a.dh_in ? static_cast<const hraw*>(a.dh_in) + r * cols : nullptr;
  hraw* __restrict grad_h = kGradH ? static_cast<hraw*>(a.grad_h) + r * cols : nullptr;
  raw* __restrict grad_input = static_cast<raw*>(a.grad_input) + r * cols;
  constexpr uint32_t kLaneBits = (1u << kVecLanes) - 1;
  const bool next = r + 1 < a.rows;
  float* __restrict pib = v.p_input_bias;
  // By value: a load through a reference after each store would not be hoisted.
  // The keep bits are drawn here, between the streaming stores (drawn during the first
  // sweep's loads instead, the fp32 backward was 0.78-0.80x of our unfused composition
  // against 0.84-0.94x, one thread, Zen 4).
  const auto sweep2 = [=, &keep](auto store) {
    for (int64_t c = 0; c < cols; c += kVectorRowMultiple) {
      keep.draw(r, c);
      const uint64_t bits = keep.get(c);
      if (next) {
        prefetch_lines(dy + cols + c, kVectorRowMultiple);
        kFromY ? prefetch_lines(y_saved + cols + c, kVectorRowMultiple)
               : prefetch_lines(h_saved + cols + c, kVectorRowMultiple);
      }
      for (int q = 0; q < kVectorRowMultiple / kVecLanes; ++q) {
        const int64_t e = c + q * kVecLanes;
        const FVec xh = xhat_at(e);
        const FVec g = mul_vec(load_vec(dy + e), load_vec(w + e));
        const FVec t = mul_vec(xh, c1);
        FVec dh = mul_vec(sub_vec(g, kRms ? t : add_vec(t, c2)), rstd);
        if (dh_in) dh = add_vec(dh, load_vec(dh_in + e));
        if constexpr (kGradH) store(grad_h + e, dh);
        const FVec out =
            keep_mul(static_cast<uint32_t>(bits >> (q * kVecLanes)) & kLaneBits, dh, scale);
        if (pib) {  // the input bias's partial adds the input's gradient as stored
          const FVec stored = round_for(grad_input, out);
          store(grad_input + e, stored);  // rounding a rounded value again gives it back
          store_vec(pib + e, add_vec(load_vec(pib + e), stored));
        } else {
          store(grad_input + e, out);
        }
      }
    }
  };
  // store(p, v): v rounded to p's type and stored (bf16: no round trip through fp32).
  if (v.stream) {
    sweep2([](auto* p, FVec x) { stream_vec(p, x); });
  } else {
    sweep2([](auto* p, FVec x) { store_vec(p, x); });
  }
}
#endif

template <DType D, bool kWide, bool kRms>
void forward_typed(Variant<D, kWide, kRms>, const NormForwardArgs& a, const LaneStream& stream) {
  using S = Stored<D>;
  using Hs = Stored<kWide ? DType::kFloat : D>;
  using raw = typename S::raw;
  using hraw = typename Hs::raw;
  using acc = typename S::acc;
  const int64_t cols = a.cols;
  const int groups = norm_groups(cols);
  const Vector<acc> weight = row_vector<acc, D>(a.weight, a.weight_fp32, cols, acc(1));
  const Vector<acc> bias = row_vector<acc, D>(a.bias, a.weight_fp32, cols, acc(-0.0));
  const Vector<acc> input_bias = row_vector<acc, D>(a.input_bias, false, cols, acc(-0.0));
  Vector<uint32_t> weight_bias;  // empty: sweep 3 loads the fp32 weight and bias
#if defined(FD_CPU_AVX512)
  if constexpr (D == DType::kBFloat16) weight_bias = bf16_pairs(weight, bias);
#endif
  const AffineConsts<acc> consts = AffineConsts<acc>::make(a.affine);
  const acc eps = static_cast<acc>(a.eps);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  using T = std::true_type;
  using F = std::false_type;
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    Vector<acc> hv(cols);  // h as stored: in the compute type, or as the vector rows read it
    // The contract's stripe accumulators; those past a row shorter than a stripe stay +0.
    alignas(64) acc sum[kMaxGroups * kStripe] = {};
    KeepRange range(stream, a.affine);
#ifdef FD_CPU_BLOCK_KERNEL
    if constexpr (kVectorRows<D>) {
      if (cols % kVectorRowMultiple == 0) {
        RowKeepWords keep(stream, a.affine, range, cols, a.rows_per_sample);
        if (r0 < r1) keep.draw_row(r0);
        // Rows of a multiple of 64 elements: aligned bases keep every row aligned.
        const auto streams = [&](const void* out, size_t size) {
          return out != nullptr && a.rows * cols * static_cast<int64_t>(size) > kStreamBytes &&
                 reinterpret_cast<uintptr_t>(out) % (kVecLanes * size) == 0;
        };
        const bool stream_y = streams(a.y, sizeof(raw)), stream_h = streams(a.h, sizeof(hraw));
        const VectorRowArgs v{weight.data(),
                              bias.data(),
                              weight_bias.empty() ? nullptr : weight_bias.data(),
                              a.input_bias ? input_bias.data() : nullptr,
                              hv.data(),
                              sum,
                              stream_y};
        const auto rows = [&](auto residual, auto h_store) {
          for (int64_t r = r0; r < r1; ++r) {
            forward_row_vector<kRms, decltype(residual)::value, decltype(h_store)::value, raw,
                               hraw>(a, v, r, keep, r + 1 < r1);
          }
        };
        const auto with_h = [&](auto residual) {
          using H = HStore;
          if (a.h == nullptr) return rows(residual, std::integral_constant<H, H::kNone>{});
          if (stream_h) return rows(residual, std::integral_constant<H, H::kStream>{});
          rows(residual, std::integral_constant<H, H::kPlain>{});
        };
        a.residual ? with_h(T{}) : with_h(F{});
        if (stream_y || stream_h) _mm_sfence();
        return;
      }
    }
#endif
    Vector<hraw> h_scratch(a.h ? 0 : cols);  // h's row when the call keeps no h
    Vector<uint8_t> keep(cols);
    for (int64_t r = r0; r < r1; ++r) {
      row_keep(range, r, cols, a.rows_per_sample, keep.data());
      // Three branch-free sweeps (presence flags as template arguments), each vectorized; the
      // first reads the operands from memory once, the others the row in L1.
      // Sweep 1: h, stored and read back as stored, added into the row sum the norm needs
      // first: S(h) (LayerNorm's mean) or S(h^2) (RMSNorm).
      const auto sweep1 = [&](auto has_residual, auto has_input_bias) {
        const raw* __restrict x = static_cast<const raw*>(a.input) + r * cols;
        const hraw* __restrict res =
            has_residual ? static_cast<const hraw*>(a.residual) + r * cols : nullptr;
        hraw* __restrict h = a.h ? static_cast<hraw*>(a.h) + r * cols : h_scratch.data();
        acc* __restrict hs = hv.data();
        const uint8_t* __restrict k = keep.data();
        const acc* __restrict ib = input_bias.data();
        const AffineConsts<acc> mc = consts;
        std::fill(sum, sum + groups * kStripe, acc(0));
        for (int64_t s0 = 0, s = 0; s0 < cols; s0 += kStripe, ++s) {
          acc* __restrict stripe = sum + stripe_group(s, groups) * kStripe;
          const int64_t len = std::min<int64_t>(kStripe, cols - s0);
          for (int64_t j = 0; j < len; ++j) {
            const int64_t c = s0 + j;
            acc in = S::load(x[c]);
            if constexpr (decltype(has_input_bias)::value) in = add_rn(in, ib[c]);
            acc v = masked_value<false>(k[c] != 0, in, mc);
            if constexpr (decltype(has_residual)::value) v = add_rn(v, Hs::load(res[c]));
            const hraw stored = Hs::store(v);
            h[c] = stored;
            const acc back = Hs::load(stored);  // the statistics and y come from h as stored
            hs[c] = back;
            stripe[j] = add_rn(stripe[j], kRms ? mul_rn(back, back) : back);
          }
        }
      };
      const auto with_input_bias = [&](auto... flags) {
        a.input_bias ? sweep1(flags..., T{}) : sweep1(flags..., F{});
      };
      a.residual ? with_input_bias(T{}) : with_input_bias(F{});
      RowStats<acc> stats{acc(0), acc(0)};
      if constexpr (kRms) {
        stats.rstd = row_rstd(stripe_tree(sum, groups), cols, eps);
      } else {
        // Sweep 2 (LayerNorm): S((h - mean)^2).
        stats.mean = row_mean(stripe_tree(sum, groups), cols);
        const acc* __restrict hs = hv.data();
        const acc mean = stats.mean;
        std::fill(sum, sum + groups * kStripe, acc(0));
        for (int64_t s0 = 0, s = 0; s0 < cols; s0 += kStripe, ++s) {
          acc* __restrict stripe = sum + stripe_group(s, groups) * kStripe;
          const int64_t len = std::min<int64_t>(kStripe, cols - s0);
          for (int64_t j = 0; j < len; ++j) {
            const acc d = sub_rn(hs[s0 + j], mean);
            stripe[j] = add_rn(stripe[j], mul_rn(d, d));
          }
        }
        stats.rstd = row_rstd(stripe_tree(sum, groups), cols, eps);
        static_cast<acc*>(a.mean)[r] = stats.mean;
      }
      static_cast<acc*>(a.rstd)[r] = stats.rstd;
      // Sweep 3: y.
      const auto sweep3 = [&](auto has_weight, auto has_bias) {
        const acc* __restrict hs = hv.data();
        const acc* __restrict w = weight.data();
        const acc* __restrict bi = bias.data();
        raw* __restrict y = static_cast<raw*>(a.y) + r * cols;
        const RowStats<acc> st = stats;
        for (int64_t c = 0; c < cols; ++c) {
          y[c] = S::store(affine_out<decltype(has_weight)::value, decltype(has_bias)::value>(
              normalized<kRms>(hs[c], st), w[c], bi[c]));
        }
      };
      const auto with_bias = [&](auto... flags) {
        a.bias ? sweep3(flags..., T{}) : sweep3(flags..., F{});
      };
      a.weight ? with_bias(T{}) : with_bias(F{});
    }
  });
}

template <DType D, bool kWide, bool kRms>
void backward_typed(Variant<D, kWide, kRms>, const NormBackwardArgs& a, const LaneStream& stream) {
  using S = Stored<D>;
  using Hs = Stored<kWide ? DType::kFloat : D>;
  using raw = typename S::raw;
  using hraw = typename Hs::raw;
  using acc = typename S::acc;
  const int64_t cols = a.cols, blocks = row_blocks(a.rows);
  const Vector<acc> weight = row_vector<acc, D>(a.weight, a.weight_fp32, cols, acc(1));
  const Vector<acc> bias =
      row_vector<acc, D>(a.saved_is_y ? a.bias : nullptr, a.weight_fp32, cols, acc(0));
  const AffineConsts<acc> consts = AffineConsts<acc>::make(a.affine);
  // The column sums' partials, one [blocks][cols] slab per sum asked for.
  acc* next = static_cast<acc*>(a.partials);
  const auto slab = [&](const void* wanted) {
    acc* p = wanted ? next : nullptr;
    if (wanted) next += blocks * cols;
    return p;
  };
  acc* const p_weight = slab(a.grad_weight);
  acc* const p_bias = slab(a.grad_bias);
  acc* const p_input_bias = slab(a.grad_input_bias);
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols * kRowBlock, 1));
  using T = std::true_type;
  using F = std::false_type;
  // Two sweeps per row over L1-resident data, each a branch-free loop that vectorizes (the
  // presence flags are template arguments). Sweep 1 reads h (or y) and dy once from memory and
  // adds, in one loop, the row sums S(g * xhat) and S(g) into the contract's stripe
  // accumulators and dy * xhat and dy into the block's column partials. Sweep 2 recomputes
  // xhat and g from the same rows (now in L1: cheaper than storing and reloading them) and
  // writes the gradients. Every value is computed by the same expressions, in the same order,
  // as the contract's reference, so the bits are those of core/norm.h's sums.
  parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int groups = norm_groups(cols);
    alignas(64) acc sum_gx[kMaxGroups * kStripe] = {}, sum_g[kMaxGroups * kStripe] = {};
    KeepRange range(stream, a.affine);
#ifdef FD_CPU_BLOCK_KERNEL
    if constexpr (kVectorRows<D>) {
      if (cols % kVectorRowMultiple == 0) {
        RowKeepWords keep(stream, a.affine, range, cols, a.rows_per_sample);
        Vector<float> unwanted(p_weight && p_bias ? 0 : cols);
        const int64_t out_bytes =
            a.rows * cols * static_cast<int64_t>(sizeof(raw) + (a.grad_h ? sizeof(hraw) : 0));
        const bool stream_out =
            out_bytes > kStreamBytes &&
            reinterpret_cast<uintptr_t>(a.grad_input) % (kVecLanes * sizeof(raw)) == 0 &&
            reinterpret_cast<uintptr_t>(a.grad_h) % (kVecLanes * sizeof(hraw)) == 0;
        const auto rows = [&](auto from_y, auto grad_h) {
          for (int64_t b = b0; b < b1; ++b) {
            const auto partial = [&](acc* p) { return p ? p + b * cols : unwanted.data(); };
            const VectorBackwardArgs v{weight.data(),
                                       bias.data(),
                                       partial(p_weight),
                                       partial(p_bias),
                                       p_input_bias ? p_input_bias + b * cols : nullptr,
                                       sum_gx,
                                       sum_g,
                                       stream_out};
            for (float* p : {v.p_weight, v.p_bias, v.p_input_bias}) {
              if (p) std::fill(p, p + cols, 0.0f);
            }
            for (int64_t r = b * kRowBlock; r < std::min(a.rows, (b + 1) * kRowBlock); ++r) {
              backward_row_vector<kRms, decltype(from_y)::value, decltype(grad_h)::value, raw,
                                  hraw>(a, v, r, keep);
            }
          }
        };
        const auto with_grad_h = [&](auto from_y) {
          a.grad_h ? rows(from_y, T{}) : rows(from_y, F{});
        };
        a.saved_is_y ? with_grad_h(T{}) : with_grad_h(F{});
        if (stream_out) _mm_sfence();
        return;
      }
    }
#endif
    Vector<uint8_t> keep(cols);
    for (int64_t b = b0; b < b1; ++b) {
      acc* pw = p_weight ? p_weight + b * cols : nullptr;
      acc* pb = p_bias ? p_bias + b * cols : nullptr;
      acc* pib = p_input_bias ? p_input_bias + b * cols : nullptr;
      for (acc* p : {pw, pb, pib}) {
        if (p) std::fill(p, p + cols, acc(0));
      }
      for (int64_t r = b * kRowBlock; r < std::min(a.rows, (b + 1) * kRowBlock); ++r) {
        const RowStats<acc> stats{
            kRms || a.saved_is_y ? acc(0) : static_cast<const acc*>(a.mean)[r],
            static_cast<const acc*>(a.rstd)[r]};
        const raw* __restrict dy = static_cast<const raw*>(a.dy) + r * cols;
        const void* saved_row =
            a.saved_is_y ? static_cast<const void*>(static_cast<const raw*>(a.saved) + r * cols)
                         : static_cast<const void*>(static_cast<const hraw*>(a.saved) + r * cols);
        const acc* __restrict w = weight.data();
        const acc* __restrict bi = bias.data();
        // xhat of column c, from h or from y; everything by value, so that no store in the
        // loops below may alias what it reads (else GCC leaves them scalar).
        const auto xhat_at = [w, bi, saved_row, stats](auto from_y, int64_t c) -> acc {
          if constexpr (decltype(from_y)::value) {
            return xhat_from_y(S::load(static_cast<const raw*>(saved_row)[c]), w[c], bi[c]);
          } else {
            return normalized<kRms>(Hs::load(static_cast<const hraw*>(saved_row)[c]),
                                    RowStats<acc>{stats.mean, stats.rstd});
          }
        };
        acc c1 = 0, c2 = 0;
        const auto sweep1 = [&](auto from_y, auto has_pw, auto has_pb) {
          std::fill(sum_gx, sum_gx + groups * kStripe, acc(0));
          std::fill(sum_g, sum_g + groups * kStripe, acc(0));
          acc* __restrict cw = pw;
          acc* __restrict cb = pb;
          for (int64_t s0 = 0, s = 0; s0 < cols; s0 += kStripe, ++s) {
            acc* __restrict agx = sum_gx + stripe_group(s, groups) * kStripe - s0;
            acc* __restrict ag = sum_g + stripe_group(s, groups) * kStripe - s0;
            const int64_t end = std::min<int64_t>(cols, s0 + kStripe);
            for (int64_t c = s0; c < end; ++c) {
              const acc xh = xhat_at(from_y, c);
              const acc d = S::load(dy[c]);
              const acc gg = mul_rn(d, w[c]);
              agx[c] = add_rn(agx[c], mul_rn(gg, xh));
              ag[c] = add_rn(ag[c], gg);
              if constexpr (decltype(has_pw)::value) cw[c] = add_rn(cw[c], mul_rn(d, xh));
              if constexpr (decltype(has_pb)::value) cb[c] = add_rn(cb[c], d);
            }
          }
          c1 = row_mean(stripe_tree(sum_gx, groups), cols);
          c2 = kRms ? acc(0) : row_mean(stripe_tree(sum_g, groups), cols);
        };
        const auto with_pb = [&](auto... flags) {
          pb ? sweep1(flags..., T{}) : sweep1(flags..., F{});
        };
        const auto with_pw = [&](auto... flags) {
          pw ? with_pb(flags..., T{}) : with_pb(flags..., F{});
        };
        a.saved_is_y ? with_pw(T{}) : with_pw(F{});
        row_keep(range, r, cols, a.rows_per_sample, keep.data());
        const hraw* dh_in = a.dh_in ? static_cast<const hraw*>(a.dh_in) + r * cols : nullptr;
        hraw* grad_h = a.grad_h ? static_cast<hraw*>(a.grad_h) + r * cols : nullptr;
        raw* grad_input = static_cast<raw*>(a.grad_input) + r * cols;
        const acc rstd = stats.rstd;
        const auto sweep2 = [&, c1, c2](auto from_y, auto has_dh_in, auto has_grad_h,
                                        auto has_pib) {
          const uint8_t* __restrict k = keep.data();
          const AffineConsts<acc> mc = consts;
          const hraw* __restrict din = dh_in;
          hraw* __restrict gh = grad_h;
          raw* __restrict gi = grad_input;
          acc* __restrict ib = pib;
          for (int64_t c = 0; c < cols; ++c) {
            const acc xh = xhat_at(from_y, c);
            const acc gg = mul_rn(S::load(dy[c]), w[c]);
            acc dh = h_gradient<kRms>(gg, xh, rstd, c1, c2);
            if constexpr (decltype(has_dh_in)::value) dh = add_rn(dh, Hs::load(din[c]));
            if constexpr (decltype(has_grad_h)::value) gh[c] = Hs::store(dh);
            const raw out = S::store(masked_value<false>(k[c] != 0, dh, mc));
            gi[c] = out;
            if constexpr (decltype(has_pib)::value) ib[c] = add_rn(ib[c], S::load(out));
          }
        };
        const auto with_pib = [&](auto... flags) {
          pib ? sweep2(flags..., T{}) : sweep2(flags..., F{});
        };
        const auto with_grad_h = [&](auto... flags) {
          grad_h ? with_pib(flags..., T{}) : with_pib(flags..., F{});
        };
        const auto with_dh_in = [&](auto... flags) {
          dh_in ? with_grad_h(flags..., T{}) : with_grad_h(flags..., F{});
        };
        a.saved_is_y ? with_dh_in(T{}) : with_dh_in(F{});
      }
    }
  });
  // The totals: the partials added in block order.
  const auto total = [&](const acc* p, void* out) {
    if (out == nullptr) return;
    parallel_for(0, cols, kGrainElements / std::max<int64_t>(blocks, 1),
                 [&](int64_t c0, int64_t c1) {
                   acc* t = static_cast<acc*>(out);
                   std::fill(t + c0, t + c1, acc(0));
                   for (int64_t b = 0; b < blocks; ++b) {  // each column in block order
                     for (int64_t c = c0; c < c1; ++c) t[c] = add_rn(t[c], p[b * cols + c]);
                   }
                 });
  };
  total(p_weight, a.grad_weight);
  total(p_bias, a.grad_bias);
  total(p_input_bias, a.grad_input_bias);
}

}  // namespace

void norm_forward_cpu(const NormForwardArgs& args, uint64_t seed, uint64_t offset) {
  const LaneStream stream(PhiloxStream::make(seed, offset));
  dispatch(args.dtype, args.wide_h, args.rms,
           [&](auto variant) { forward_typed(variant, args, stream); });
}

void norm_backward_cpu(const NormBackwardArgs& args, uint64_t seed, uint64_t offset) {
  const LaneStream stream(PhiloxStream::make(seed, offset));
  dispatch(args.dtype, args.wide_h, args.rms,
           [&](auto variant) { backward_typed(variant, args, stream); });
}

}  // namespace FD_CPU_NS
}  // namespace fused_dropout
