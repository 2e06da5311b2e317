// The keep decision of the RNG contract, version 2 (DESIGN.md s.2), host+device:
// written once here and called by the CPU loops and the CUDA kernels.
//
// One Philox call decides kMaskPerCall = 8 mask elements. The 16-bit number u(m)
// of mask element m is half m % 2 (0: low 16 bits) of word (m / 2) % 4 of the
// block of counter group g = m / 8. With T the 32-bit threshold, Th = T >> 16
// and Tl = T & 0xFFFF, m is kept iff
//   u(m) < Th,  or  u(m) == Th and v(m) < Tl,
// where v(m) is the same half of the tie stream's block for g, drawn only on a
// tie (probability 2^-16 per element). So P(keep) = T / 2^32 exactly.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/philox.h"

namespace fused_dropout {

constexpr int kMaskPerCall = 8;

// T = min(floor((1 - p) * 2^32), 2^32 - 1), computed in double.
inline uint32_t keep_threshold(double p) {
  const double scaled = std::floor((1.0 - p) * 4294967296.0);
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
}

// The threshold split for 16-bit numbers.
struct KeepRule {
  uint32_t hi;  // Th: a first-draw number below it keeps, equal to it ties
  uint32_t lo;  // Tl: a tied element keeps iff its tie-draw number is below it

  FD_HD static KeepRule make(uint32_t threshold) { return {threshold >> 16, threshold & 0xFFFFu}; }
};

// u (or v) of element j (0..7, a compile-time constant after unrolling) of a block.
FD_HD uint32_t block_half(const PhiloxBlock& b, int j) {
  const uint32_t w = b.w[j / 2];
  return j % 2 == 0 ? w & 0xFFFFu : w >> 16;
}

// Which elements of a block tie: bit j set iff u(j) == Th.
FD_HD uint32_t tie_bits(const PhiloxBlock& b, const KeepRule& r) {
  uint32_t ties = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kMaskPerCall; ++j)
    ties |= static_cast<uint32_t>(block_half(b, j) == r.hi) << j;
  return ties;
}

// Whether any of a block's numbers ties: the common case (no tie) decides each
// element by first_draw_keeps alone. Two halves per word at once: x = w ^ (Th, Th)
// has a zero half iff a number ties, and (x - 0x00010001) & ~x sets bit 15 of a
// half iff that half is zero (a borrow into the high half needs a zero low half).
FD_HD bool block_has_tie(const PhiloxBlock& b, const KeepRule& r) {
  const uint32_t both = r.hi * 0x00010001u;
  uint32_t zero_halves = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int q = 0; q < kMaskPerCall / 2; ++q) {
    const uint32_t x = b.w[q] ^ both;
    zero_halves |= (x - 0x00010001u) & ~x;
  }
  return (zero_halves & 0x80008000u) != 0;
}

// The first draw's verdict on element j of a block without a tie: u(j) < Th. A high
// half is compared in place (u < Th iff w < Th << 16), which saves its shift.
FD_HD bool first_draw_keeps(const PhiloxBlock& b, int j, const KeepRule& r) {
  const uint32_t w = b.w[j / 2];
  return j % 2 == 0 ? (w & 0xFFFFu) < r.hi : w < (r.hi << 16);
}

// Which of the tied elements `ties` of counter group g are kept: the tie draw's
// number below Tl. Rare (probability about 8 * 2^-16 per group).
FD_HD uint32_t resolve_ties(const PhiloxStream& s, const KeepRule& r, uint64_t g, uint32_t ties) {
  const PhiloxBlock v = s.tie_group(g);
  uint32_t keep = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kMaskPerCall; ++j) {
    keep |= static_cast<uint32_t>(block_half(v, j) < r.lo) << j;
  }
  return keep & ties;
}

// keep[j] for element j of counter group g, whose first-draw block is b.
FD_HD void decide8(const PhiloxBlock& b, const PhiloxStream& s, const KeepRule& r, uint64_t g,
                   bool (&keep)[kMaskPerCall]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kMaskPerCall; ++j) keep[j] = first_draw_keeps(b, j, r);
  if (__builtin_expect(block_has_tie(b, r), 0)) {
    const uint32_t won = resolve_ties(s, r, g, tie_bits(b, r));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < kMaskPerCall; ++j) keep[j] = keep[j] || ((won >> j) & 1u) != 0;
  }
}

// keep[j] for mask element 8g + j.
FD_HD void keep8(const PhiloxStream& s, const KeepRule& r, uint64_t g, bool (&keep)[kMaskPerCall]) {
  decide8(s.group(g), s, r, g, keep);
}

// The same as bits: bit j for mask element 8g + j.
FD_HD uint32_t keep_bits8(const PhiloxStream& s, const KeepRule& r, uint64_t g) {
  bool keep[kMaskPerCall];
  keep8(s, r, g, keep);
  uint32_t bits = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kMaskPerCall; ++j) bits |= static_cast<uint32_t>(keep[j]) << j;
  return bits;
}

}  // namespace fused_dropout
