// One SIMD register of fp32 lanes (AVX-512: 16, AVX2: 8) for the block kernels of
// cpu/dropout.cpp and cpu/norm.cpp: fp32 and bf16 loads and stores, and masked multiplies
// straight from the keep bits (cpu/keep_bits.h). Each function is the core's per-element
// arithmetic on every lane (IEEE adds and multiplies, no contraction; the core's bf16
// rounding: nearest even, NaN -> 0x7FC0), so the reference tests compare these paths bit for
// bit like every other one. Include it from kernel files only (cpu/capability.h).
#pragma once

#include <cstdint>

#include "cpu/keep_bits.h"

namespace fused_dropout {
namespace FD_CPU_NS {
namespace {

#ifdef FD_CPU_BLOCK_KERNEL
#if defined(FD_CPU_AVX512)
using FVec = __m512;
using IVec = __m512i;
constexpr int kVecLanes = 16;
inline FVec load_vec(const float* p) { return _mm512_loadu_ps(p); }
using HalfVec = __m256i;  // the low halves of a vector's lanes, packed
// Packed bf16 to fp32 (exact): word i into the high half of lane i, zeros below (one
// zero-masked vpermw instead of a widening and a shift).
inline FVec bf16_unpack(HalfVec h) {
  const __m512i high_words = _mm512_setr_epi32(0 << 16, 1 << 16, 2 << 16, 3 << 16, 4 << 16, 5 << 16,
                                               6 << 16, 7 << 16, 8 << 16, 9 << 16, 10 << 16,
                                               11 << 16, 12 << 16, 13 << 16, 14 << 16, 15 << 16);
  return _mm512_castsi512_ps(
      _mm512_maskz_permutexvar_epi16(0xAAAAAAAA, high_words, _mm512_castsi256_si512(h)));
}
inline FVec load_vec(const uint16_t* p) {
  return bf16_unpack(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// The bf16 bits of each lane (in its low half).
inline IVec bf16_bits(FVec v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(_mm512_srli_epi32(biased, 16), nan, _mm512_set1_epi32(0x7FC0));
}
inline HalfVec pack_halves(IVec low) { return _mm512_cvtepi32_epi16(low); }
// The core's bf16 rounding of each lane, packed. With AVX512-BF16, vcvtneps2bf16: it rounds
// to nearest even as bf16_bits does, but flushes denormals to zero and keeps a NaN's payload,
// so a vector holding either (rare) takes the integer form.
inline HalfVec bf16_pack(FVec v) {
#if defined(__AVX512BF16__)
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: QNaN, denormal, SNaN
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, kNanOrDenormal) == 0, 1)) {
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  }
#endif
  return pack_halves(bf16_bits(v));
}
// bf16_unpack(bf16_pack(v)), unpacked in place where the rounding is the integer form.
inline FVec bf16_round(FVec v) {
#if defined(__AVX512BF16__)
  return bf16_unpack(bf16_pack(v));
#else
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
#endif
}
inline void store_halves(uint16_t* p, HalfVec h) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
inline void stream_halves(uint16_t* p, HalfVec h) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
}
inline void store_vec(float* p, FVec v) { _mm512_storeu_ps(p, v); }
inline void stream_vec(float* p, FVec v) { _mm512_stream_ps(p, v); }
inline FVec add_vec(FVec a, FVec b) { return _mm512_add_ps(a, b); }
inline FVec sub_vec(FVec a, FVec b) { return _mm512_sub_ps(a, b); }
inline FVec mul_vec(FVec a, FVec b) { return _mm512_mul_ps(a, b); }
inline FVec div_vec(FVec a, FVec b) { return _mm512_div_ps(a, b); }
// Lanes of `bits` (16 keep bits) set: v * s; the others +0.
inline FVec keep_mul(uint32_t bits, FVec v, FVec s) {
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(bits), v, s);
}
inline FVec splat(float f) { return _mm512_set1_ps(f); }
// The low and high bf16 halves of each 32-bit word of p, as floats: two vectors from one load.
inline void load_pairs(const uint32_t* p, FVec& low, FVec& high) {
  const __m512i v = _mm512_loadu_si512(p);
  low = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  high = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
}
#else
using FVec = __m256;
using IVec = __m256i;
constexpr int kVecLanes = 8;
inline FVec load_vec(const float* p) { return _mm256_loadu_ps(p); }
inline FVec load_vec(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// The bf16 bits of each lane (in its low half).
inline IVec bf16_bits(FVec v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(_mm256_srli_epi32(biased, 16), _mm256_set1_epi32(0x7FC0), nan);
}
using HalfVec = __m128i;  // the low halves of a vector's lanes, packed
inline HalfVec pack_halves(IVec low) {
  return _mm_packus_epi32(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1));
}
// The core's bf16 rounding of each lane, packed.
inline HalfVec bf16_pack(FVec v) { return pack_halves(bf16_bits(v)); }
// Packed bf16 back to fp32 (exact).
inline FVec bf16_unpack(HalfVec h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// bf16_unpack(bf16_pack(v)), unpacked in place.
inline FVec bf16_round(FVec v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
inline void store_halves(uint16_t* p, HalfVec h) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
inline void stream_halves(uint16_t* p, HalfVec h) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
}
inline void store_vec(float* p, FVec v) { _mm256_storeu_ps(p, v); }
inline void stream_vec(float* p, FVec v) { _mm256_stream_ps(p, v); }
inline FVec add_vec(FVec a, FVec b) { return _mm256_add_ps(a, b); }
inline FVec sub_vec(FVec a, FVec b) { return _mm256_sub_ps(a, b); }
inline FVec mul_vec(FVec a, FVec b) { return _mm256_mul_ps(a, b); }
inline FVec div_vec(FVec a, FVec b) { return _mm256_div_ps(a, b); }
// Lanes of `bits` (8 keep bits) set: v * s; the others +0.
inline FVec keep_mul(uint32_t bits, FVec v, FVec s) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set =
      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
  return _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_mul_ps(v, s));
}
inline FVec splat(float f) { return _mm256_set1_ps(f); }
#endif

inline void store_vec(uint16_t* p, FVec v) { store_halves(p, bf16_pack(v)); }
// store_vec past the caches (a non-temporal store; p aligned to the stored bytes): for
// outputs too large to stay in them, whose writes then need no read of the line first.
// A task that streams ends with _mm_sfence(), so the stores are seen before it returns.
inline void stream_vec(uint16_t* p, FVec v) { stream_halves(p, bf16_pack(v)); }

// Asks for the cache lines of elements [0, n) of p (64-byte aligned) that a later sweep reads.
template <typename T>
inline void prefetch_lines(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64) {
    _mm_prefetch(bytes + i, _MM_HINT_T0);
  }
}

// v as the storage type of `p` holds it, back in fp32: bf16-rounded, or v itself.
inline FVec round_for(const uint16_t*, FVec v) { return bf16_round(v); }
inline FVec round_for(const float*, FVec v) { return v; }
// Stores v at p (streams it: kStream) and returns round_for(p, v), rounding once.
template <bool kStream>
inline FVec round_store(uint16_t* p, FVec v) {
  const HalfVec h = bf16_pack(v);
  kStream ? stream_halves(p, h) : store_halves(p, h);
  return bf16_unpack(h);
}
template <bool kStream>
inline FVec round_store(float* p, FVec v) {
  kStream ? stream_vec(p, v) : store_vec(p, v);
  return v;
}
// round_store<true>(p, v), and the same value stored plainly at q.
inline FVec round_stream_copy(uint16_t* p, uint16_t* q, FVec v) {
  const HalfVec h = bf16_pack(v);
  stream_halves(p, h);
  store_halves(q, h);
  return bf16_unpack(h);
}
inline FVec round_stream_copy(float* p, float* q, FVec v) {
  stream_vec(p, v);
  store_vec(q, v);
  return v;
}
#endif

}  // namespace
}  // namespace FD_CPU_NS
}  // namespace fused_dropout
