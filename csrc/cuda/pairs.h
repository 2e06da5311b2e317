// Rounding of float results to fp16 / bf16 a pair per instruction, shared by the kernels
// (cuda/dropout.cu, cuda/norm.cu). Device code; the host model runs it with NVIDIA's host
// conversions (testing/cuda_host.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace fused_dropout {

template <typename T>
__device__ __forceinline__ uint32_t pair_bits(const T& pair) {
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// y[0 .. 2 * kWords) rounded to bf16 into kWords words (element 2i the low half of word i) by
// the hardware, whose round to nearest even equals the core's float_to_bf16_bits but for NaN,
// whose pattern it chooses.
template <int kWords>
__device__ __forceinline__ void pack_bf16_pairs(const float* y, uint32_t* words) {
#pragma unroll
  for (int i = 0; i < kWords; ++i)
    words[i] = pair_bits(__floats2bfloat162_rn(y[2 * i], y[2 * i + 1]));
}

// The same, with a NaN (rare: one test per pair) made the core's 0x7FC0, so that the CPU and
// GPU agree.
template <int kWords>
__device__ __forceinline__ void round_bf16_pairs(const float* y, uint32_t* words) {
  pack_bf16_pairs<kWords>(y, words);
  bool nan = false;
#pragma unroll
  for (int i = 0; i < kWords; ++i) nan |= y[2 * i] != y[2 * i] || y[2 * i + 1] != y[2 * i + 1];
  if (__builtin_expect(nan, 0)) {
#pragma unroll
    for (int j = 0; j < 2 * kWords; ++j) {
      if (y[j] != y[j]) {
        const int shift = 16 * (j % 2);
        words[j / 2] = (words[j / 2] & ~(0xFFFFu << shift)) | (0x7FC0u << shift);
      }
    }
  }
}

}  // namespace fused_dropout
