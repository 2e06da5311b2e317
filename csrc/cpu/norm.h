// CPU entry points of the fused dropout + residual add + norm (see core/norm.h).
#pragma once

#include <cstdint>

#include "core/norm.h"
#include "cpu/capability.h"

namespace fused_dropout {

// Runs one forward call on the CPU with the stream (seed, offset).
FD_CPU_KERNEL(norm_forward_cpu, void(const NormForwardArgs& args, uint64_t seed, uint64_t offset))

// Runs one backward call on the CPU with the forward's (seed, offset).
FD_CPU_KERNEL(norm_backward_cpu, void(const NormBackwardArgs& args, uint64_t seed, uint64_t offset))

}  // namespace fused_dropout
