// CPU loops of every masked op: at::parallel_for over blocks of elements,
// each block drawing its Philox words in a batch the compiler vectorizes and
// then applying core/masked_op.h's per-element arithmetic.
#include "cpu/dropout.h"

#include <algorithm>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <type_traits>

namespace fused_dropout {
namespace FD_CPU_NS {  // a kernel file (cpu/capability.h): compiled once per CPU capability
namespace {

// Mask elements per Philox batch: kLanes independent counter groups (one SIMD
// register of 32-bit lanes, core/philox.h), 8 elements each (core/keep.h). A block
// is kBatches batches whose rounds are interleaved: one batch's chain of dependent
// multiplies leaves the multiplier idle, two keep it busy (Zen 1, a Philox-only
// loop: 1.82 -> 1.62 cycles per element; three or four batches are slower).
using LaneVec = PhiloxLanes;
constexpr int64_t kLanes = sizeof(LaneVec) / sizeof(uint32_t);
constexpr int64_t kBatch = kMaskPerCall * kLanes;
constexpr int kBatches = 2;
constexpr int64_t kBlock = kBatch * kBatches;
// Work per parallel task; below this the call runs inline on one thread.
constexpr int64_t kGrainElements = 1 << 15;

// The 16-bit float types, as tags: they are stored as uint16_t.
struct Half;
struct BFloat16;

// How a dtype is stored and converted on the CPU. fp16 and bf16 go through the
// core's bit-level conversions, which the compiler vectorizes (c10's bf16 does not).
template <typename scalar_t>
struct Storage {
  using raw = scalar_t;
  using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static acc load(raw v) { return static_cast<acc>(v); }
  static raw store(acc v) { return static_cast<raw>(v); }
};

template <>
struct Storage<BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return bf16_bits_to_float(v); }
  static raw store(acc v) { return float_to_bf16_bits(v); }
};

template <>
struct Storage<Half> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return half_bits_to_float(v); }
  static raw store(acc v) { return float_to_half_bits(v); }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
#define FD_CPU_AVX512 1
#elif defined(__AVX2__) && !defined(__AVX512F__)
#define FD_CPU_AVX2 1
#endif
#if defined(FD_CPU_AVX512) || defined(FD_CPU_AVX2)
#define FD_CPU_BLOCK_KERNEL 1
#endif

// The first-draw Philox words of counter groups g0 .. g0 + kLanes - 1, lane l
// holding group g0 + l: the lanes run as one vector through the shared round.
struct BlockWords {
  LaneVec w[4];
};

// The contract's stream with its round keys broadcast to every lane, once per call
// (the rounds then take them as memory operands instead of broadcasting each time).
struct LaneStream : PhiloxStream {
  LaneVec k0[kPhiloxRounds], k1[kPhiloxRounds];

  explicit LaneStream(const PhiloxStream& s) : PhiloxStream(s) {
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const PhiloxKey rk = philox_round_key(key, r);
      k0[r] = LaneVec{} + rk.k0;
      k1[r] = LaneVec{} + rk.k1;
    }
  }
};

// The first-draw words of the kBatches batches from counter group g0 (batch i:
// groups g0 + i * kLanes ..), round by round.
void philox_blocks(const LaneStream& stream, uint64_t g0, BlockWords (&out)[kBatches]) {
  LaneVec lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;  // 0, 1, 2, ...: folded to a constant
  // The counters are built with vector ops: lane-wise stores of runtime values
  // followed by a vector load would stall on store forwarding.
  LaneVec c[kBatches][4];
  for (int i = 0; i < kBatches; ++i) {
    const uint64_t first = g0 + uint64_t(i) * kLanes;
    const uint32_t first_lo = static_cast<uint32_t>(first);
    c[i][0] = lane * 0u + stream.o_lo;
    c[i][1] = lane * 0u + stream.o_hi;
    c[i][2] = lane + first_lo;
    c[i][3] = static_cast<uint32_t>(first >> 32) -
              reinterpret_cast<LaneVec>(c[i][2] < first_lo);  // the carry into g_hi
  }
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int i = 0; i < kBatches; ++i) {
      philox_round(c[i][0], c[i][1], c[i][2], c[i][3], stream.k0[r], stream.k1[r]);
    }
  }
  for (int i = 0; i < kBatches; ++i) out[i] = {{c[i][0], c[i][1], c[i][2], c[i][3]}};
}

// Keep bits of the kBlock mask elements of a block: bit j of word j / 64 is
// element 8 * g0 + j, so byte l is counter group g0 + l.
struct KeepBits {
  uint64_t w[kBlock / 64];
};

// The whole rule of core/keep.h per lane, ties included: the reference form, and
// what the SIMD forms fall back to for a batch with a tie. Writes the batch's
// kBatch / 64 words of bits.
void keep_bits_per_group(const PhiloxStream& stream, const KeepRule& rule, uint64_t g0,
                         const BlockWords& b, uint64_t* bits) {
  for (int i = 0; i < kBatch / 64; ++i) bits[i] = 0;
  for (int l = 0; l < kLanes; ++l) {
    bool keep[kMaskPerCall];
    decide8({{b.w[0][l], b.w[1][l], b.w[2][l], b.w[3][l]}}, stream, rule, g0 + l, keep);
    for (int j = 0; j < kMaskPerCall; ++j) {
      bits[l / 8] |= static_cast<uint64_t>(keep[j]) << (8 * (l % 8) + j);
    }
  }
}

// The keep bits of one batch from counter group g0, whose words are b.
void batch_keep_bits(const PhiloxStream& stream, const KeepRule& rule, uint64_t g0,
                     const BlockWords& b, uint64_t* bits) {
#if defined(FD_CPU_AVX512)
  // Word j of lane l holds the numbers of elements 8l + 2j (low half) and
  // 8l + 2j + 1: bits 2l and 2l + 1 of one 32-half compare, spread by pdep.
  const __m512i th = _mm512_set1_epi16(static_cast<short>(rule.hi));
  __mmask32 tie = 0;
  bits[0] = bits[1] = 0;
  for (int j = 0; j < 4; ++j) {
    const __m512i u = reinterpret_cast<__m512i>(b.w[j]);
    const uint32_t k = _mm512_cmplt_epu16_mask(u, th);
    tie |= _mm512_cmpeq_epu16_mask(u, th);
    const uint64_t spread = 0x0303030303030303ull << (2 * j);
    bits[0] |= _pdep_u64(k & 0xFFFFu, spread);
    bits[1] |= _pdep_u64(k >> 16, spread);
  }
  if (__builtin_expect(tie != 0, 0)) keep_bits_per_group(stream, rule, g0, b, bits);
#elif defined(FD_CPU_AVX2)
  // A 4x8 transpose of the words puts the 16-bit numbers in element order
  // (e[q]: elements 16q .. 16q + 15); unsigned compares as signed ones on x ^ 0x8000.
  const __m256i w0 = reinterpret_cast<__m256i>(b.w[0]), w1 = reinterpret_cast<__m256i>(b.w[1]);
  const __m256i w2 = reinterpret_cast<__m256i>(b.w[2]), w3 = reinterpret_cast<__m256i>(b.w[3]);
  const __m256i t0 = _mm256_unpacklo_epi32(w0, w1), t1 = _mm256_unpacklo_epi32(w2, w3);
  const __m256i t2 = _mm256_unpackhi_epi32(w0, w1), t3 = _mm256_unpackhi_epi32(w2, w3);
  const __m256i l04 = _mm256_unpacklo_epi64(t0, t1), l15 = _mm256_unpackhi_epi64(t0, t1);
  const __m256i l26 = _mm256_unpacklo_epi64(t2, t3), l37 = _mm256_unpackhi_epi64(t2, t3);
  const __m256i e[4] = {
      _mm256_permute2x128_si256(l04, l15, 0x20), _mm256_permute2x128_si256(l26, l37, 0x20),
      _mm256_permute2x128_si256(l04, l15, 0x31), _mm256_permute2x128_si256(l26, l37, 0x31)};
  const __m256i flip = _mm256_set1_epi16(static_cast<short>(0x8000));
  const __m256i th = _mm256_set1_epi16(static_cast<short>(rule.hi));
  const __m256i th_flipped = _mm256_xor_si256(th, flip);
  __m256i k[4], tie = _mm256_setzero_si256();
  for (int q = 0; q < 4; ++q) {
    k[q] = _mm256_cmpgt_epi16(th_flipped, _mm256_xor_si256(e[q], flip));
    tie = _mm256_or_si256(tie, _mm256_cmpeq_epi16(e[q], th));
  }
  // packs interleaves the 128-bit halves; permute4x64 restores element order.
  const auto bytes = [](__m256i a, __m256i c) {
    return static_cast<uint32_t>(
        _mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(a, c), 0xD8)));
  };
  bits[0] = bytes(k[0], k[1]) | static_cast<uint64_t>(bytes(k[2], k[3])) << 32;
  if (__builtin_expect(!_mm256_testz_si256(tie, tie), 0)) {
    keep_bits_per_group(stream, rule, g0, b, bits);
  }
#else
  keep_bits_per_group(stream, rule, g0, b, bits);
#endif
}

// Keep bits of the block from mask element m0 (a multiple of 8).
KeepBits keep_bits(const LaneStream& stream, const MaskedAffine& a, int64_t m0) {
  KeepBits bits;
  if (a.keep_all || a.threshold == 0) {
    for (auto& w : bits.w) w = a.keep_all ? ~uint64_t(0) : 0;
    return bits;
  }
  const uint64_t g0 = static_cast<uint64_t>(m0) / kMaskPerCall;
  const KeepRule rule = KeepRule::make(a.threshold);
  BlockWords b[kBatches];
  philox_blocks(stream, g0, b);
  for (int i = 0; i < kBatches; ++i) {
    batch_keep_bits(stream, rule, g0 + uint64_t(i) * kLanes, b[i], bits.w + i * (kBatch / 64));
  }
  return bits;
}

// keep[j] for mask elements m0 + j, j < kBlock; m0 is a multiple of 8.
void draw_keep_block(const LaneStream& stream, const MaskedAffine& a, int64_t m0, uint8_t* keep) {
  const KeepBits bits = keep_bits(stream, a, m0);
#if defined(FD_CPU_AVX512)
  for (int i = 0; i < kBlock / 64; ++i) {
    _mm512_storeu_si512(keep + 64 * i, _mm512_maskz_set1_epi8(bits.w[i], 1));
  }
#elif defined(FD_CPU_AVX2)
  // Byte j of 32 takes bit j: replicate each source byte 8 times, test its bit.
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                          2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201ll);
  for (int i = 0; i < kBlock / 32; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits.w[i / 2] >> (32 * (i % 2)));
    const __m256i rep = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(word)), spread);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + 32 * i),
                        _mm256_and_si256(set, _mm256_set1_epi8(1)));
  }
#else
  for (int j = 0; j < kBlock; ++j) keep[j] = static_cast<uint8_t>(bits.w[j / 64] >> (j % 64) & 1);
#endif
}

#ifdef FD_CPU_BLOCK_KERNEL
// A full batch of fp32 or bf16 elements with masked multiplies straight from the
// keep bits: masked_value's arithmetic without the keep-byte array (kept:
// x * scale; dropped: +0 by the zeroing mask; then + residual) and the core's
// bf16 rounding (nearest even, NaN -> 0x7FC0). The reference tests compare it
// bit for bit like every other path.
#if defined(FD_CPU_AVX512)
using FVec = __m512;
constexpr int kVecLanes = 16;
inline FVec load_vec(const float* p) { return _mm512_loadu_ps(p); }
inline FVec load_vec(const uint16_t* p) {
  const __m512i wide =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store_vec(float* p, FVec v) { _mm512_storeu_ps(p, v); }
inline void store_vec(uint16_t* p, FVec v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i r =
      _mm512_mask_mov_epi32(_mm512_srli_epi32(biased, 16), nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline FVec add_vec(FVec a, FVec b) { return _mm512_add_ps(a, b); }
// Lanes of `bits` (16 keep bits) set: v * s; the others +0.
inline FVec keep_mul(uint32_t bits, FVec v, FVec s) {
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(bits), v, s);
}
inline FVec splat(float f) { return _mm512_set1_ps(f); }
#else
using FVec = __m256;
constexpr int kVecLanes = 8;
inline FVec load_vec(const float* p) { return _mm256_loadu_ps(p); }
inline FVec load_vec(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline void store_vec(float* p, FVec v) { _mm256_storeu_ps(p, v); }
inline void store_vec(uint16_t* p, FVec v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i r =
      _mm256_blendv_epi8(_mm256_srli_epi32(biased, 16), _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline FVec add_vec(FVec a, FVec b) { return _mm256_add_ps(a, b); }
// Lanes of `bits` (8 keep bits) set: v * s; the others +0.
inline FVec keep_mul(uint32_t bits, FVec v, FVec s) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set =
      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
  return _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_mul_ps(v, s));
}
inline FVec splat(float f) { return _mm256_set1_ps(f); }
#endif

template <typename scalar_t>
constexpr bool kBlockKernel = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>;

// The first kCount elements of a block (a multiple of 64); bias, when kBias, is the
// block's slice of the bias (the block is inside one row).
template <bool kResidual, bool kBias, int64_t kCount = kBlock, typename raw>
void apply_block(const raw* x, const raw* residual, const raw* bias, raw* out, const KeepBits& bits,
                 float scale) {
  static_assert(kCount % 64 == 0 && kCount <= kBlock);
  const FVec s = splat(scale);
  constexpr int kPerWord = 64 / kVecLanes;
  for (int q = 0; q < kCount / kVecLanes; ++q) {
    const int e = kVecLanes * q;
    FVec v = load_vec(x + e);
    if constexpr (kBias) v = add_vec(v, load_vec(bias + e));
    const uint32_t k = static_cast<uint32_t>(bits.w[q / kPerWord] >> (kVecLanes * (q % kPerWord)));
    FVec y = keep_mul(k & ((1u << kVecLanes) - 1), v, s);
    if constexpr (kResidual) y = add_vec(y, load_vec(residual + e));
    store_vec(out + e, y);
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

// Elements [e0, e0 + n) with keep flags keep[0 .. n), split at row ends when there is a
// bias so that it never wraps inside a segment.
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void apply_keep(const Operands<scalar_t>& o, int64_t e0, int64_t n, const uint8_t* keep) {
  if constexpr (!kBias) {
    apply_segment<true, kResidual, false, kShift>(o, e0, n, keep, 0);
  } else {
    for (int64_t k = 0; k < n;) {
      const int64_t col = (e0 + k) % o.bias_len;
      const int64_t len = std::min(n - k, o.bias_len - col);
      apply_segment<true, kResidual, true, kShift>(o, e0 + k, len, keep + k, col);
      k += len;
    }
  }
}

// Element-wise mask: one Philox batch per block of kBlock elements. The elements come in
// segments whose mask indices are consecutive (one segment without a box; rows of the box,
// MaskMap, with one): segment s holds elements [s * seg, ...) from mask index
// base + s * seg_stride. A segment is a head, up to the next multiple of 8 in the mask (drawn
// from its group and peeled off), then blocks whose mask indices start at multiples of 8, so
// the SIMD paths draw whole Philox groups whatever the base.
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void run_elementwise(const Operands<scalar_t>& o, const MaskedOpArgs& a, const LaneStream& stream) {
  const MaskMap& map = a.map;
  const int64_t seg = map.boxed ? map.seg : a.numel;
  const int64_t nseg = (a.numel + seg - 1) / seg;
  const int64_t chunks = 1 + (seg + kBlock - 1) / kBlock;  // the head, then the blocks
  parallel_for(0, nseg * chunks, kGrainElements / kBlock, [&](int64_t t0, int64_t t1) {
    alignas(64) uint8_t keep[kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / chunks, c = t % chunks;
      const int64_t seg_begin = s * seg;
      const int64_t seg_end = std::min(seg_begin + seg, a.numel);
      const int64_t m_begin = map.boxed ? map.base + s * map.seg_stride : 0;
      const int64_t head =
          std::min(seg_end - seg_begin, (kMaskPerCall - m_begin % kMaskPerCall) % kMaskPerCall);
      if (c == 0) {
        if (head > 0) {
          const int64_t into = m_begin % kMaskPerCall;
          draw_keep_block(stream, a.affine, m_begin - into, keep);
          apply_keep<kResidual, kBias, kShift>(o, seg_begin, head, keep + into);
        }
        continue;
      }
      const int64_t e0 = seg_begin + head + (c - 1) * kBlock;
      if (e0 >= seg_end) continue;
      const int64_t m0 = m_begin + head + (c - 1) * kBlock;  // a multiple of 8
      const int64_t n = std::min(kBlock, seg_end - e0);
#ifdef FD_CPU_BLOCK_KERNEL
      if constexpr (kBlockKernel<scalar_t> && !kShift) {
        const int64_t col = kBias ? e0 % o.bias_len : 0;
        if (n == kBlock && (!kBias || col + kBlock <= o.bias_len)) {
          const KeepBits bits = keep_bits(stream, a.affine, m0);
          apply_block<kResidual, kBias>(o.x + e0, kResidual ? o.residual + e0 : nullptr,
                                        kBias ? o.bias + col : nullptr, o.out + e0, bits,
                                        o.consts.scale);
          continue;
        }
      }
#endif
      draw_keep_block(stream, a.affine, m0, keep);
      apply_keep<kResidual, kBias, kShift>(o, e0, n, keep);
    }
  });
}

// keep[j] for the global mask indices [m, m + n), any m: from whole blocks drawn at
// multiples of 8.
void draw_keep_range(const LaneStream& stream, const MaskedAffine& a, int64_t m, int64_t n,
                     uint8_t* keep) {
  alignas(64) uint8_t block[kBlock];
  while (n > 0) {
    const int64_t into = m % kMaskPerCall;
    draw_keep_block(stream, a, m - into, block);
    const int64_t len = std::min(n, kBlock - into);
    std::copy(block + into, block + into + len, keep);
    keep += len, m += len, n -= len;
  }
}

// keep[j] for the local mask indices [q0, q0 + kBlock) (q0 a multiple of kBlock; those past
// mask_numel are left as they are): through the box when there is one.
void draw_keep_local(const LaneStream& stream, const MaskedAffine& a, const MaskMap& map,
                     int64_t q0, uint8_t* keep) {
  if (!map.boxed) return draw_keep_block(stream, a, q0, keep);
  const int64_t q1 = std::min(q0 + kBlock, map.mask_numel);
  for (int64_t q = q0; q < q1;) {
    const int64_t s = q / map.seg, in = q % map.seg;
    const int64_t len = std::min(q1 - q, map.seg - in);
    draw_keep_range(stream, a, map.base + s * map.seg_stride + in, len, keep + (q - q0));
    q += len;
  }
}

// Mask over leading dims: draw all mask_numel flags once (one Philox call per
// 8 mask elements; through the box, if any), then stream the elements in runs that share a flag
// (contiguous) or walk the channels of each position (channels-last; never
// with a bias, which needs the contiguous layout).
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void run_broadcast(const Operands<scalar_t>& o, const MaskedOpArgs& a, const LaneStream& stream) {
  const MaskMap& map = a.map;
  const int64_t nblocks = (map.mask_numel + kBlock - 1) / kBlock;
  Vector<uint8_t> keep(nblocks * kBlock);
  parallel_for(0, nblocks, kGrainElements / kBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      draw_keep_local(stream, a.affine, map, b * kBlock, &keep[b * kBlock]);
    }
  });
  parallel_for(0, a.numel, kGrainElements, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t outer = i / map.run;
      if (map.period == 1) {
        int64_t len = std::min(i1, (outer + 1) * map.run) - i;
        const int64_t col = kBias ? i % o.bias_len : 0;
        if (kBias) len = std::min(len, o.bias_len - col);
        const uint8_t* flag = &keep[outer * map.stride];
#ifdef FD_CPU_BLOCK_KERNEL
        if constexpr (kBlockKernel<scalar_t> && !kShift && !kBias) {
          // The whole run shares one flag: full batches as masked multiplies.
          KeepBits bits;
          for (auto& w : bits.w) w = *flag ? ~uint64_t(0) : 0;
          for (; len >= kBatch; len -= kBatch, i += kBatch) {
            apply_block<kResidual, false, kBatch>(o.x + i, kResidual ? o.residual + i : nullptr,
                                                  o.bias, o.out + i, bits, o.consts.scale);
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
void run_typed(const MaskedOpArgs& a, const LaneStream& stream) {
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
  const LaneStream stream(PhiloxStream::make(seed, offset));
  switch (args.dtype) {
    case DType::kFloat:
      return run_typed<float>(args, stream);
    case DType::kDouble:
      return run_typed<double>(args, stream);
    case DType::kHalf:
      return run_typed<Half>(args, stream);
    case DType::kBFloat16:
      return run_typed<BFloat16>(args, stream);
  }
}

}  // namespace FD_CPU_NS
}  // namespace fused_dropout
