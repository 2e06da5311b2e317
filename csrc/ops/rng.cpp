#include "ops/rng.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

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

namespace {

// The pair the next op call on `device` would use, drawn now on the host and advancing the
// generator exactly as that call would (CUDA: philox_cuda_state(4) under its mutex). It lets
// drop_path_residual decide on the CPU which samples to keep before its branch runs, with no
// device sync.
std::vector<int64_t> draw_seed_offset(c10::Device device, std::optional<at::Generator> generator) {
  TORCH_CHECK(device.is_cpu() || device.is_cuda(),
              "fused_dropout.draw_seed_offset: expected a CPU or CUDA device, got ", device);
  const RngSource rng{std::nullopt, std::nullopt, generator};
  if (device.is_cpu()) {
    const auto [seed, offset] = cpu_pair(rng, /*draw=*/true);
    return {static_cast<int64_t>(seed), static_cast<int64_t>(offset)};
  }
#ifdef FUSED_DROPOUT_WITH_CUDA
  const at::PhiloxCudaState philox = cuda_philox_state(rng, /*draw=*/true, device.index());
  // Under capture the pair is only known at replay: a host-side decision would be frozen.
  TORCH_CHECK(!philox.captured_,
              "fused_dropout.drop_path_residual cannot run under CUDA graph capture: it decides "
              "on the host which samples to keep, and a captured graph would replay one decision "
              "forever. Use drop_path_add (convert(model) without skip_dropped), which captures.");
  return {static_cast<int64_t>(philox.seed_.val), static_cast<int64_t>(philox.offset_.val)};
#else
  TORCH_CHECK(false,
              "fused_dropout.draw_seed_offset: this build of fused_dropout has no CUDA kernels");
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_dropout, CompositeExplicitAutograd, m) {
  m.impl("draw_seed_offset", draw_seed_offset);
}

}  // namespace fused_dropout
