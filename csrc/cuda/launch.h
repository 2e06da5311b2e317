// Grid sizing shared by the CUDA launchers (cuda/dropout.cu, cuda/norm.cu): a grid fills the
// device and no more, from each kernel variant's own occupancy (the kernels stride over the
// rest). Host code only; the host model (testing/cuda_host.h) provides the runtime calls.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace fused_dropout::launch {

// Multiprocessors of the current device, queried once per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= kMaxDevices) return 1;
  if (counts[device] == 0) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    counts[device] = std::max(count, 1);
  }
  return counts[device];
}

// Blocks of `Kernel` (launched with `kThreads` threads a block) resident per multiprocessor,
// queried once per device. One cache per kernel: a template on the kernel itself, not on its
// type, which all variants of a dtype share while each has its own register count.
template <auto Kernel, int kThreads>
int resident_blocks() {
  constexpr int kMaxDevices = 64;
  static int blocks[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= kMaxDevices) return 1;
  if (blocks[device] == 0) {
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, 0);
    blocks[device] = std::max(n, 1);
  }
  return blocks[device];
}

// Blocks for `work` items of which a block takes `per_block` at a time: at least one (every
// kernel writes the pair, even for an empty tensor), at most what the device holds at once.
template <auto Kernel, int kThreads>
int grid_for(int64_t work, int64_t per_block) {
  const int64_t wanted = (work + per_block - 1) / per_block;
  const int64_t full = int64_t(sm_count()) * resident_blocks<Kernel, kThreads>();
  return static_cast<int>(std::clamp<int64_t>(wanted, 1, full));
}

inline bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

}  // namespace fused_dropout::launch
