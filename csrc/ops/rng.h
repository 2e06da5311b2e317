// Where the (seed, offset) pair of one op call comes from (DESIGN.md section 2).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Generator.h>

#include <cstdint>
#include <optional>
#include <utility>

#ifdef FUSED_DROPOUT_WITH_CUDA
#include <ATen/cuda/PhiloxCudaState.h>
#endif

namespace fused_dropout {

struct RngSource {
  std::optional<int64_t> seed, offset;     // explicit pair
  std::optional<at::Generator> generator;  // else draw from this or the default generator
  const at::Tensor* pair = nullptr;        // backward: the pair the forward used
};

// The CPU pair: the explicit or saved pair, else (one 64-bit draw of the CPU generator, 0).
// With draw == false (nothing to mask) the generator is left untouched and (0, 0) returned.
std::pair<uint64_t, uint64_t> cpu_pair(const RngSource& rng, bool draw);

#ifdef FUSED_DROPOUT_WITH_CUDA
// The CUDA Philox state: the explicit pair, else philox_cuda_state(4) of the device's generator
// under its mutex (graph-safe). A saved pair (rng.pair) is read by the kernel itself.
at::PhiloxCudaState cuda_philox_state(const RngSource& rng, bool draw, c10::DeviceIndex device);
#endif

}  // namespace fused_dropout
