// Kernels that need their threads to cooperate (shared memory, __syncthreads, warp shuffles
// and votes): tests/test_cuda_host.py runs them to show that the host model of CUDA
// (cuda_host.h) executes such code as a GPU does. Written as CUDA; built only by that model.
#include <cstdint>
#include <cstdio>
#include <string>

namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// out[i] = in[block_start + blockDim.x - 1 - t]: each block reverses its slice through shared
// memory, so every thread reads what another one wrote before the barrier.
__global__ void reverse_kernel(const int* in, int* out) {
  __shared__ int slice[1024];
  const int t = threadIdx.x;
  const int base = blockIdx.x * blockDim.x;
  slice[t] = in[base + t];
  __syncthreads();
  out[base + t] = slice[blockDim.x - 1 - t];
}

// out[block] = sum of the block's slice: a shuffle tree per warp, the warps' sums through
// shared memory, then a butterfly (xor shuffles) in the first warp.
__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int d = warpSize / 2; d > 0; d /= 2) v += __shfl_down_sync(kFullMask, v, d);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x / warpSize) ? warp_sums[lane] : 0.0f;
    for (int d = warpSize / 2; d > 0; d /= 2) v += __shfl_xor_sync(kFullMask, v, d);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// out[warp] = the ballot of the warp's predicates.
__global__ void ballot_kernel(const int* predicate, unsigned* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned votes = __ballot_sync(kFullMask, predicate[i]);
  if (threadIdx.x % warpSize == 0) out[i / warpSize] = votes;
}

// A barrier that half of the block never reaches: undefined on a GPU, an error in the model.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

int finish(char* error, int size) {
  const std::string& text = cuda_host::launch_log().error;
  const cudaError_t status = cudaGetLastError();
  if (text.empty() && status == cudaSuccess) return 0;
  std::snprintf(error, size, "%s", text.empty() ? "launch failed" : text.c_str());
  return 1;
}

}  // namespace

// Which kernel, on `blocks` blocks of `threads`; the buffers are as each kernel documents.
extern "C" __attribute__((visibility("default"))) int fdh_cooperation(const char* kernel,
                                                                      int blocks, int threads,
                                                                      const void* in, void* out,
                                                                      char* error, int size) {
  cuda_host::launch_log() = {};
  cuda_host::host_config() = {};
  const std::string name = kernel;
  if (name == "reverse") {
    reverse_kernel<<<blocks, threads>>>(static_cast<const int*>(in), static_cast<int*>(out));
  } else if (name == "block_sum") {
    block_sum_kernel<<<blocks, threads>>>(static_cast<const float*>(in), static_cast<float*>(out));
  } else if (name == "ballot") {
    ballot_kernel<<<blocks, threads>>>(static_cast<const int*>(in), static_cast<unsigned*>(out));
  } else if (name == "divergent_barrier") {
    divergent_barrier_kernel<<<blocks, threads>>>(static_cast<int*>(out));
  } else {
    std::snprintf(error, size, "no kernel %s", kernel);
    return 1;
  }
  return finish(error, size);
}
