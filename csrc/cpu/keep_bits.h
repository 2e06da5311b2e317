// The contract's keep decisions on the CPU, many at once: Philox batches of SIMD lanes
// (core/philox.h) turned into keep bits (core/keep.h). Shared by the kernel files
// (cpu/dropout.cpp, cpu/norm.cpp) and compiled with each of them once per CPU capability
// (cpu/capability.h): include it from kernel files only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "core/masked_op.h"
#include "cpu/capability.h"

namespace fused_dropout {
namespace FD_CPU_NS {
namespace {

// Mask elements per Philox batch: kPhiloxLanes independent counter groups (one SIMD
// register of 32-bit lanes, core/philox.h), 8 elements each (core/keep.h). A block
// is kBatches batches whose rounds are interleaved: one batch's chain of dependent
// multiplies leaves the multiplier idle, two keep it busy (Zen 1, a Philox-only
// loop: 1.82 -> 1.62 cycles per element; three or four batches are slower).
using LaneVec = PhiloxLanes;
constexpr int64_t kPhiloxLanes = sizeof(LaneVec) / sizeof(uint32_t);
constexpr int64_t kBatch = kMaskPerCall * kPhiloxLanes;
constexpr int kBatches = 2;
constexpr int64_t kBlock = kBatch * kBatches;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
#define FD_CPU_AVX512 1
#elif defined(__AVX2__) && !defined(__AVX512F__)
#define FD_CPU_AVX2 1
#endif
#if defined(FD_CPU_AVX512) || defined(FD_CPU_AVX2)
#define FD_CPU_BLOCK_KERNEL 1
#endif

// The first-draw Philox words of counter groups g0 .. g0 + kPhiloxLanes - 1, lane l
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

#if defined(FD_CPU_AVX512)
// The first-draw words of the kBatches batches from counter group g0 (batch i:
// groups g0 + i * kPhiloxLanes ..), round by round. Each counter word sits in a 64-bit lane
// (8 counters per register, two registers per batch), of which only the low half counts:
// vpmuludq multiplies low halves and leaves hi:lo in place, so a round is 2 multiplies, 2
// shifts and 2 three-way xors per register (12 instructions per 16 counters, against 16
// with the words packed, which need blends to pack each product again). The words are
// packed into 32-bit lanes once, after the last round.
FD_ALWAYS_INLINE void philox_blocks(const LaneStream& stream, uint64_t g0,
                                    BlockWords (&out)[kBatches]) {
  constexpr int kHalves = kPhiloxLanes / 8;
  constexpr int kXor3 = 0x96;  // vpternlog: a ^ b ^ c
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c[kBatches][kHalves][4];
  for (int i = 0; i < kBatches; ++i) {
    for (int h = 0; h < kHalves; ++h) {
      const __m512i g = _mm512_add_epi64(
          lane, _mm512_set1_epi64(static_cast<long long>(g0 + uint64_t(i) * kPhiloxLanes + 8 * h)));
      c[i][h][0] = _mm512_set1_epi64(stream.o_lo);
      c[i][h][1] = _mm512_set1_epi64(stream.o_hi);
      c[i][h][2] = g;                         // g_lo in the low half
      c[i][h][3] = _mm512_srli_epi64(g, 32);  // g_hi, the carry included
    }
  }
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; ++r) {
    // the round keys, in every 32-bit lane: in the low half of each 64-bit one too
    const __m512i k0 = reinterpret_cast<__m512i>(stream.k0[r]);
    const __m512i k1 = reinterpret_cast<__m512i>(stream.k1[r]);
    for (int i = 0; i < kBatches; ++i) {
      for (auto& w : c[i]) {  // philox_round, on 64-bit lanes
        const __m512i p0 = _mm512_mul_epu32(w[0], m0), p1 = _mm512_mul_epu32(w[2], m1);
        w[0] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), w[1], k0, kXor3);
        w[2] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), w[3], k1, kXor3);
        w[1] = p1;  // lo1 in the low half
        w[3] = p0;
      }
    }
  }
  // The low halves of both registers, in lane order.
  const __m512i low_halves =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int i = 0; i < kBatches; ++i) {
    for (int j = 0; j < 4; ++j) {
      out[i].w[j] =
          reinterpret_cast<LaneVec>(_mm512_permutex2var_epi32(c[i][0][j], low_halves, c[i][1][j]));
    }
  }
}
#else
// The first-draw words of the kBatches batches from counter group g0 (batch i:
// groups g0 + i * kPhiloxLanes ..), round by round.
FD_ALWAYS_INLINE void philox_blocks(const LaneStream& stream, uint64_t g0,
                                    BlockWords (&out)[kBatches]) {
  LaneVec lane;
  for (int l = 0; l < kPhiloxLanes; ++l) lane[l] = l;  // 0, 1, 2, ...: folded to a constant
  // The counters are built with vector ops: lane-wise stores of runtime values
  // followed by a vector load would stall on store forwarding.
  LaneVec c[kBatches][4];
  for (int i = 0; i < kBatches; ++i) {
    const uint64_t first = g0 + uint64_t(i) * kPhiloxLanes;
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
#endif

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
  for (int l = 0; l < kPhiloxLanes; ++l) {
    bool keep[kMaskPerCall];
    decide8({{b.w[0][l], b.w[1][l], b.w[2][l], b.w[3][l]}}, stream, rule, g0 + l, keep);
    for (int j = 0; j < kMaskPerCall; ++j) {
      bits[l / 8] |= static_cast<uint64_t>(keep[j]) << (8 * (l % 8) + j);
    }
  }
}

// The keep bits of one batch from counter group g0, whose words are b.
FD_ALWAYS_INLINE void batch_keep_bits(const PhiloxStream& stream, const KeepRule& rule, uint64_t g0,
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

// Keep bits of the block from mask element m0 (a multiple of 8), inlined into the caller:
// with AVX-512 KeepWords draws between the vector work of a sweep, where a call would spill
// that work's registers around it (bf16 norm forward at BERT size, 1 thread: 2-3% faster).
FD_ALWAYS_INLINE KeepBits keep_bits_inline(const LaneStream& stream, const MaskedAffine& a,
                                           int64_t m0) {
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
    batch_keep_bits(stream, rule, g0 + uint64_t(i) * kPhiloxLanes, b[i],
                    bits.w + i * (kBatch / 64));
  }
  return bits;
}

// keep_bits_inline as a call: for callers that draw a block on its own.
KeepBits keep_bits(const LaneStream& stream, const MaskedAffine& a, int64_t m0) {
  return keep_bits_inline(stream, a, m0);
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

// keep[i] for mask elements m0 + i, i < n, any m0: whole blocks drawn as needed and the last
// one kept, so a task's consecutive ranges (rows in order) draw each block once.
class KeepRange {
 public:
  KeepRange(const LaneStream& stream, const MaskedAffine& affine)
      : stream_(stream), affine_(affine) {}

  void flags(int64_t m0, int64_t n, uint8_t* keep) {
    while (n > 0) {
      const int64_t b0 = m0 / kBlock * kBlock;
      if (b0 != cached_) {
        draw_keep_block(stream_, affine_, b0, block_);
        cached_ = b0;
      }
      const int64_t len = std::min(n, b0 + kBlock - m0);
      std::memcpy(keep, block_ + (m0 - b0), static_cast<size_t>(len));
      keep += len;
      m0 += len;
      n -= len;
    }
  }

 private:
  const LaneStream& stream_;
  const MaskedAffine& affine_;
  int64_t cached_ = -1;
  alignas(64) uint8_t block_[kBlock];
};

// The 64 keep bits of mask elements m .. m + 63 (m a multiple of 64; bit j: element m + j),
// from whole blocks drawn at multiples of kBlock, the last one kept: rows of a multiple of
// 64 elements, taken in order, draw each block once.
class KeepWords {
 public:
  KeepWords(const LaneStream& stream, const MaskedAffine& affine)
      : stream_(stream), affine_(affine) {}

  uint64_t at(int64_t m) {
    const int64_t b0 = m / kBlock * kBlock;
    if (b0 != cached_) {
#if defined(FD_CPU_AVX512)
      bits_ = keep_bits_inline(stream_, affine_, b0);
#else
      bits_ = keep_bits(stream_, affine_, b0);  // inlined, AVX2's bf16 forward was 2% slower
#endif
      cached_ = b0;
    }
    return bits_.w[(m - b0) / 64];
  }

 private:
  const LaneStream& stream_;
  const MaskedAffine& affine_;
  int64_t cached_ = -1;
  KeepBits bits_;
};

}  // namespace
}  // namespace FD_CPU_NS
}  // namespace fused_dropout
