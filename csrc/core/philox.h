// Philox4x32-10 (Salmon et al., SC'11), written once for host and device.
// The CPU loops and the CUDA kernels both call these functions, so the CPU
// test suite executes the exact arithmetic the GPU runs.
#pragma once

#include <cstdint>

#if !defined(__CUDACC__) && (defined(__AVX512F__) || defined(__AVX2__))
#include <immintrin.h>
#endif

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline __attribute__((always_inline))
#endif

namespace fused_dropout {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct PhiloxKey {
  uint32_t k0, k1;
};

struct PhiloxBlock {
  uint32_t w[4];
};

FD_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

#if !defined(__CUDACC__)
// The CPU runs one SIMD register of counters at once (16 with AVX-512, else 8):
// the same round arithmetic on a vector of words (GCC/Clang vector extensions).
#if defined(__AVX512F__)
typedef uint32_t PhiloxLanes __attribute__((vector_size(64)));
typedef uint64_t PhiloxLanes64 __attribute__((vector_size(64)));
#else
typedef uint32_t PhiloxLanes __attribute__((vector_size(32)));
typedef uint64_t PhiloxLanes64 __attribute__((vector_size(32)));
#endif

// even/odd: the 32x32->64 products of the even and odd lanes (vpmuludq), whose low
// and high words are blended into lo and hi: 7 instructions for 8 (or 16) lanes.
// The generic form (no AVX2) spells the same with vector extensions; GCC emits a slow
// full 64x64 multiply for it.
inline void mulhilo32(PhiloxLanes a, uint32_t b, PhiloxLanes& hi, PhiloxLanes& lo) {
#if defined(__AVX512F__)
  const __m512i va = reinterpret_cast<__m512i>(a), m = _mm512_set1_epi64(b);
  const __m512i even = _mm512_mul_epu32(va, m),
                odd = _mm512_mul_epu32(_mm512_srli_epi64(va, 32), m);
  constexpr __mmask16 kOdd = 0xAAAA;  // the high word of each 64-bit lane
  lo = reinterpret_cast<PhiloxLanes>(
      _mm512_mask_blend_epi32(kOdd, even, _mm512_slli_epi64(odd, 32)));
  hi = reinterpret_cast<PhiloxLanes>(
      _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(even, 32), odd));
#elif defined(__AVX2__)
  const __m256i va = reinterpret_cast<__m256i>(a), m = _mm256_set1_epi64x(b);
  const __m256i even = _mm256_mul_epu32(va, m),
                odd = _mm256_mul_epu32(_mm256_srli_epi64(va, 32), m);
  constexpr int kOdd = 0xAA;  // the high word of each 64-bit lane
  lo = reinterpret_cast<PhiloxLanes>(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), kOdd));
  hi = reinterpret_cast<PhiloxLanes>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, kOdd));
#else
  const PhiloxLanes64 wide = reinterpret_cast<PhiloxLanes64&>(a);
  const PhiloxLanes64 even = (wide & 0xFFFFFFFFu) * b;
  const PhiloxLanes64 odd = (wide >> 32) * b;
  const PhiloxLanes64 lo64 = (even & 0xFFFFFFFFu) | (odd << 32);
  const PhiloxLanes64 hi64 = (even >> 32) | (odd & 0xFFFFFFFF00000000u);
  lo = reinterpret_cast<const PhiloxLanes&>(lo64);
  hi = reinterpret_cast<const PhiloxLanes&>(hi64);
#endif
}
#endif

// One Philox round on a counter held in four words; U is uint32_t, or a vector
// of independent counters on the CPU (whose round keys K may be vectors too).
template <typename U, typename K>
FD_HD void philox_round(U& c0, U& c1, U& c2, U& c3, K k0, K k1) {
  U hi0, lo0, hi1, lo1;
  mulhilo32(c0, kPhiloxM0, hi0, lo0);
  mulhilo32(c2, kPhiloxM1, hi1, lo1);
  const U n0 = hi1 ^ c1 ^ k0;
  const U n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// The key of round r (0-based): the Weyl sequence bump applied r times.
FD_HD PhiloxKey philox_round_key(PhiloxKey key, int r) {
  return {key.k0 + kPhiloxW0 * static_cast<uint32_t>(r),
          key.k1 + kPhiloxW1 * static_cast<uint32_t>(r)};
}

FD_HD PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const PhiloxKey rk = philox_round_key(key, r);
    philox_round(c0, c1, c2, c3, rk.k0, rk.k1);
  }
  return {{c0, c1, c2, c3}};
}

// The streams of the contract (DESIGN.md s.2, version 2): key = seed, counter =
// (o_lo, o_hi, g_lo, g_hi) with o = offset / 4 and g = m / 8 the counter group of
// mask element m. The tie stream, drawn only when a 16-bit number ties the
// threshold (core/keep.h), sets the top bit of o_hi: offset < 2^63 leaves it free.
struct PhiloxStream {
  PhiloxKey key;
  uint32_t o_lo, o_hi;

  static constexpr uint32_t kTieBit = 0x80000000u;

  FD_HD static PhiloxStream make(uint64_t seed, uint64_t offset) {
    const uint64_t o = offset / 4;
    return {{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
            static_cast<uint32_t>(o),
            static_cast<uint32_t>(o >> 32)};
  }

  // The four words of counter group g (the first draw of mask elements 8g .. 8g+7).
  FD_HD PhiloxBlock group(uint64_t g) const {
    return philox4x32_10(o_lo, o_hi, static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), key);
  }

  // The tie draw of counter group g.
  FD_HD PhiloxBlock tie_group(uint64_t g) const {
    return philox4x32_10(o_lo, o_hi | kTieBit, static_cast<uint32_t>(g),
                         static_cast<uint32_t>(g >> 32), key);
  }
};

}  // namespace fused_dropout
