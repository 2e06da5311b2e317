#include "ops/rng.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

#ifdef FUSED_DROPOUT_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

namespace fused_dropout {

std::pair<uint64_t, uint64_t> cpu_pair(const RngSource& rng, bool draw) {
  if (rng.pair) {
    const int64_t* v = rng.pair->const_data_ptr<int64_t>();
    return {static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
  }
  if (rng.seed) return {static_cast<uint64_t>(*rng.seed), static_cast<uint64_t>(*rng.offset)};
  if (!draw) return {0, 0};
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      rng.generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return {gen->random64(), 0};
}

#ifdef FUSED_DROPOUT_WITH_CUDA
at::PhiloxCudaState cuda_philox_state(const RngSource& rng, bool draw, c10::DeviceIndex device) {
  if (rng.seed) {
    return at::PhiloxCudaState(static_cast<uint64_t>(*rng.seed),
                               static_cast<uint64_t>(*rng.offset));
  }
  if (!draw || rng.pair) return at::PhiloxCudaState(0, 0);
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      rng.generator, at::cuda::detail::getDefaultCUDAGenerator(device));
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(4);
}
#endif

}  // namespace fused_dropout
