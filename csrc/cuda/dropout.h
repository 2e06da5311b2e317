// CUDA entry point of the masked ops (see core/masked_op.h). Plain C++: no
// torch headers beyond the raw Philox state, so ops.cpp and the .cu share it.
#pragma once

#include <ATen/cuda/PhiloxCudaState.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/masked_op.h"

namespace fused_dropout {

// Runs one masked op on `stream`. The (seed, offset) pair comes from
// `pair_in` (a device int64[2], for backward) when it is not null, else from
// `philox` (graph-safe); a non-null `pair_out` receives the pair used.
// Returns the launch's error status.
cudaError_t masked_op_cuda(const MaskedOpArgs& args, at::PhiloxCudaState philox,
                           const int64_t* pair_in, int64_t* pair_out, cudaStream_t stream);

}  // namespace fused_dropout
