// CPU loops of every masked op: at::parallel_for over blocks of elements,
// each block drawing its Philox words in a batch the compiler vectorizes and
// then applying core/masked_op.h's per-element arithmetic.
#include "cpu/dropout.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace fused_dropout {
namespace {

// Elements per Philox batch: kLanes independent counters (one SIMD register of
// 32-bit lanes, core/philox.h), 4 words each.
using LaneVec = PhiloxLanes;
constexpr int64_t kLanes = sizeof(LaneVec) / sizeof(uint32_t);
constexpr int64_t kBlock = 4 * kLanes;
// Work per parallel task; below this the call runs inline on one thread.
constexpr int64_t kGrainElements = 1 << 15;

// How a dtype is stored and converted on the CPU. bfloat16 goes through the
// core's bit-level conversion, which the compiler vectorizes (c10's does not).
template <typename scalar_t>
struct Storage {
  using raw = scalar_t;
  using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static acc load(raw v) { return static_cast<acc>(v); }
  static raw store(acc v) { return static_cast<raw>(v); }
};

template <>
struct Storage<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return bf16_bits_to_float(v); }
  static raw store(acc v) { return float_to_bf16_bits(v); }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
#define FD_CPU_AVX512 1
#endif

// The Philox words of the kBlock mask elements from m0 (a multiple of 4): the
// kLanes counter groups run as one vector through the shared Philox round. Word
// j of group l decides element 4l + j.
struct BlockWords {
  LaneVec w[4];
};

BlockWords philox_block(const PhiloxStream& stream, int64_t m0) {
  const uint64_t g0 = static_cast<uint64_t>(m0) / 4;
  const uint32_t g0_lo = static_cast<uint32_t>(g0);
  LaneVec lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;  // 0, 1, 2, ...: folded to a constant
  // The counters are built with vector ops: lane-wise stores of runtime values
  // followed by a vector load would stall on store forwarding.
  LaneVec c0 = lane * 0u + stream.o_lo;
  LaneVec c1 = lane * 0u + stream.o_hi;
  LaneVec c2 = lane + g0_lo;
  LaneVec c3 = static_cast<uint32_t>(g0 >> 32) - reinterpret_cast<LaneVec>(c2 < g0_lo);  // carry
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const PhiloxKey rk = philox_round_key(stream.key, r);
    philox_round(c0, c1, c2, c3, rk.k0, rk.k1);
  }
  return {{c0, c1, c2, c3}};
}

#ifdef FD_CPU_AVX512
// Bit j: keep mask element m0 + j (j < kBlock = 64; m0 a multiple of 4).
uint64_t keep_bits(const PhiloxStream& stream, const MaskedAffine& a, int64_t m0) {
  if (a.keep_all || a.threshold == 0) return a.keep_all ? ~uint64_t(0) : 0;
  const BlockWords b = philox_block(stream, m0);
  const __m512i t = _mm512_set1_epi32(static_cast<int>(a.threshold));
  uint64_t bits = 0;
  for (int j = 0; j < 4; ++j) {  // word j of group l decides element 4l + j
    const uint64_t m = _mm512_cmplt_epu32_mask(reinterpret_cast<__m512i>(b.w[j]), t);
    bits |= _pdep_u64(m, 0x1111111111111111ull << j);
  }
  return bits;
}
#endif

// keep[j] for mask elements m0 + j, j < kBlock; m0 is a multiple of 4.
void draw_keep_block(const PhiloxStream& stream, const MaskedAffine& a, int64_t m0, uint8_t* keep) {
#ifdef FD_CPU_AVX512
  _mm512_storeu_si512(keep, _mm512_maskz_set1_epi8(keep_bits(stream, a, m0), 1));
#else
  if (a.keep_all || a.threshold == 0) {
    std::fill(keep, keep + kBlock, static_cast<uint8_t>(a.keep_all));
    return;
  }
  const BlockWords b = philox_block(stream, m0);
#if (defined(__clang__) || __GNUC__ >= 12) && !defined(__AVX512F__)
  // Interleave the four compare results of kLanes = 8 counters into 32 bytes.
  typedef uint8_t u8x8 __attribute__((vector_size(8)));
  typedef uint8_t u8x16 __attribute__((vector_size(16)));
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  u8x8 k[4];
  for (int j = 0; j < 4; ++j) k[j] = __builtin_convertvector(b.w[j] < a.threshold, u8x8) & 1;
#define FD_ZIP8 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15
  const u8x16 k01 = __builtin_shufflevector(k[0], k[1], FD_ZIP8);
  const u8x16 k23 = __builtin_shufflevector(k[2], k[3], FD_ZIP8);
  const u16x16 all = __builtin_shufflevector(reinterpret_cast<const u16x8&>(k01),
                                             reinterpret_cast<const u16x8&>(k23), FD_ZIP8);
#undef FD_ZIP8
  static_assert(sizeof(all) == kBlock);
  __builtin_memcpy(keep, &all, kBlock);
#else
  for (int l = 0; l < kLanes; ++l) {
    for (int j = 0; j < 4; ++j) keep[4 * l + j] = keep_word(b.w[j][l], a.threshold);
  }
#endif
#endif
}

#ifdef FD_CPU_AVX512
// A full block of fp32 or bf16 elements with masked multiplies straight from the
// keep bits: masked_value's arithmetic without the keep-byte array (kept:
// x * scale; dropped: +0 by the zeroing mask; then + residual) and the core's
// bf16 rounding (nearest even, NaN -> 0x7FC0). The reference tests compare it
// bit for bit like every other path.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i wide =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i r =
      _mm512_mask_mov_epi32(_mm512_srli_epi32(biased, 16), nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

template <typename scalar_t>
constexpr bool kBlockKernel =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// bias, when kBias, is the block's slice of the bias (the block is inside one row).
template <bool kResidual, bool kBias, typename raw>
void apply_block(const raw* x, const raw* residual, const raw* bias, raw* out, uint64_t bits,
                 float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int q = 0; q < 4; ++q) {
    __m512 v = load16(x + 16 * q);
    if constexpr (kBias) v = _mm512_add_ps(v, load16(bias + 16 * q));
    __m512 y = _mm512_maskz_mul_ps(static_cast<__mmask16>(bits >> (16 * q)), v, s);
    if constexpr (kResidual) y = _mm512_add_ps(y, load16(residual + 16 * q));
    store16(out + 16 * q, y);
  }
}
#endif

// The operands of one call, typed.
template <typename scalar_t>
struct Operands {
  using S = Storage<scalar_t>;
  const typename S::raw* x;
  const typename S::raw* residual;
  const typename S::raw* bias;
  typename S::raw* out;
  int64_t bias_len;
  AffineConsts<typename S::acc> consts;
};

// Elements [i, i + len): keep flag keep[k] (kPerElementKeep) or keep[0] for all.
// The bias, if any, starts at column col and does not wrap inside the segment.
// Out of line: inlined into the parallel loops, GCC does not vectorize it for AVX2.
template <bool kPerElementKeep, bool kResidual, bool kBias, bool kShift, typename scalar_t>
__attribute__((noinline)) void apply_segment(const Operands<scalar_t>& o, int64_t i, int64_t len,
                                             const uint8_t* keep, int64_t col) {
  using S = Storage<scalar_t>;
  // Locals, not loads through `o`: a store to out could alias `o` as far as
  // the compiler knows, which would stop it from vectorizing the loop.
  const AffineConsts<typename S::acc> consts = o.consts;
  const auto* x = o.x + i;
  const auto* residual = o.residual + i;
  const auto* bias = o.bias + col;
  auto* out = o.out + i;  // may be x itself (in place): each element is read, then written
#if defined(__clang__)
#pragma clang loop vectorize(assume_safety)
#elif defined(__GNUC__)
#pragma GCC ivdep
#endif
  for (int64_t k = 0; k < len; ++k) {
    auto v = S::load(x[k]);
    if constexpr (kBias) v = add_rn(v, S::load(bias[k]));
    auto y = masked_value<kShift>(static_cast<bool>(keep[kPerElementKeep ? k : 0]), v, consts);
    if constexpr (kResidual) y = add_rn(y, S::load(residual[k]));
    out[k] = S::store(y);
  }
}

// Element-wise mask: one Philox batch per block of kBlock elements.
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void run_elementwise(const Operands<scalar_t>& o, const MaskedOpArgs& a,
                     const PhiloxStream& stream) {
  const int64_t nblocks = (a.numel + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrainElements / kBlock, [&](int64_t b0, int64_t b1) {
    alignas(64) uint8_t keep[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kBlock;
      const int64_t n = std::min(kBlock, a.numel - e0);
#ifdef FD_CPU_AVX512
      if constexpr (kBlockKernel<scalar_t> && !kShift) {
        const int64_t col = kBias ? e0 % o.bias_len : 0;
        if (n == kBlock && (!kBias || col + kBlock <= o.bias_len)) {
          const uint64_t bits = keep_bits(stream, a.affine, e0);
          apply_block<kResidual, kBias>(o.x + e0, kResidual ? o.residual + e0 : nullptr,
                                        kBias ? o.bias + col : nullptr, o.out + e0, bits,
                                        o.consts.scale);
          continue;
        }
      }
#endif
      draw_keep_block(stream, a.affine, e0, keep);
      if constexpr (!kBias) {
        apply_segment<true, kResidual, false, kShift>(o, e0, n, keep, 0);
      } else {  // split at row ends so the bias never wraps inside a segment
        for (int64_t k = 0; k < n;) {
          const int64_t col = (e0 + k) % o.bias_len;
          const int64_t len = std::min(n - k, o.bias_len - col);
          apply_segment<true, kResidual, true, kShift>(o, e0 + k, len, keep + k, col);
          k += len;
        }
      }
    }
  });
}

// Mask over leading dims: draw all mask_numel flags once (one Philox word per
// mask element), then stream the elements in runs that share a flag
// (contiguous) or walk the channels of each position (channels-last; never
// with a bias, which needs the contiguous layout).
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void run_broadcast(const Operands<scalar_t>& o, const MaskedOpArgs& a, const PhiloxStream& stream) {
  const MaskMap& map = a.map;
  const int64_t nblocks = (map.mask_numel + kBlock - 1) / kBlock;
  std::vector<uint8_t> keep(nblocks * kBlock);
  at::parallel_for(0, nblocks, kGrainElements / kBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      draw_keep_block(stream, a.affine, b * kBlock, &keep[b * kBlock]);
    }
  });
  at::parallel_for(0, a.numel, kGrainElements, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t outer = i / map.run;
      if (map.period == 1) {
        int64_t len = std::min(i1, (outer + 1) * map.run) - i;
        const int64_t col = kBias ? i % o.bias_len : 0;
        if (kBias) len = std::min(len, o.bias_len - col);
        const uint8_t* flag = &keep[outer * map.stride];
#ifdef FD_CPU_AVX512
        if constexpr (kBlockKernel<scalar_t> && !kShift && !kBias) {
          // The whole run shares one flag: full blocks as masked multiplies.
          const uint64_t bits = *flag ? ~uint64_t(0) : 0;
          for (; len >= kBlock; len -= kBlock, i += kBlock) {
            apply_block<kResidual, false>(o.x + i, kResidual ? o.residual + i : nullptr, o.bias,
                                          o.out + i, bits, o.consts.scale);
          }
        }
#endif
        apply_segment<false, kResidual, kBias, kShift>(o, i, len, flag, col);
        i += len;
      } else {
        const int64_t c = i % map.period;
        const int64_t len = std::min(i1 - i, map.period - c);
        apply_segment<true, kResidual, false, kShift>(o, i, len, &keep[outer * map.stride + c], 0);
        i += len;
      }
    }
  });
}

template <typename scalar_t>
void run_typed(const MaskedOpArgs& a, const PhiloxStream& stream) {
  using S = Storage<scalar_t>;
  using raw = typename S::raw;
  const Operands<scalar_t> o{static_cast<const raw*>(a.input),
                             static_cast<const raw*>(a.residual),
                             static_cast<const raw*>(a.bias),
                             static_cast<raw*>(a.out),
                             a.bias_len,
                             AffineConsts<typename S::acc>::make(a.affine)};
  // Alpha dropout (the only op with a shift) has neither residual nor bias; a bias
  // comes only with a residual (dropout_add).
  const bool residual = a.residual != nullptr;
  if (!a.map.elementwise()) {
    if (a.affine.has_shift) return run_broadcast<false, false, true>(o, a, stream);
    if (a.bias != nullptr) return run_broadcast<true, true, false>(o, a, stream);
    residual ? run_broadcast<true, false, false>(o, a, stream)
             : run_broadcast<false, false, false>(o, a, stream);
  } else if (a.affine.has_shift) {
    run_elementwise<false, false, true>(o, a, stream);
  } else if (a.bias != nullptr) {
    residual ? run_elementwise<true, true, false>(o, a, stream)
             : run_elementwise<false, true, false>(o, a, stream);
  } else {
    residual ? run_elementwise<true, false, false>(o, a, stream)
             : run_elementwise<false, false, false>(o, a, stream);
  }
}

}  // namespace

void masked_op_cpu(const MaskedOpArgs& args, uint64_t seed, uint64_t offset) {
  if (args.numel == 0) return;
  const PhiloxStream stream = PhiloxStream::make(seed, offset);
  switch (args.dtype) {
    case DType::kFloat:
      return run_typed<float>(args, stream);
    case DType::kDouble:
      return run_typed<double>(args, stream);
    case DType::kHalf:
      return run_typed<c10::Half>(args, stream);
    case DType::kBFloat16:
      return run_typed<c10::BFloat16>(args, stream);
  }
}

}  // namespace fused_dropout
