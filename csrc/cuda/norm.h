// CUDA entry points of the fused dropout + residual add + norm (see core/norm.h; the CPU's are
// cpu/norm.h). Plain C++: no torch headers beyond the raw Philox state, so ops/fused_norm.cpp
// and the .cu share it.
#pragma once

#include <ATen/cuda/PhiloxCudaState.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/norm.h"

namespace fused_dropout {

// Runs one forward call on `stream` with the pair of `philox` (graph-safe); a non-null
// `pair_out` (a device int64[2]) receives the pair used. Returns the launch's error status.
cudaError_t norm_forward_cuda(const NormForwardArgs& args, at::PhiloxCudaState philox,
                              int64_t* pair_out, cudaStream_t stream);

// Runs one backward call on `stream` with the forward's pair, read by the kernel from
// `pair_in` (a device int64[2]). Returns the launches' error status.
cudaError_t norm_backward_cuda(const NormBackwardArgs& args, const int64_t* pair_in,
                               cudaStream_t stream);

}  // namespace fused_dropout
