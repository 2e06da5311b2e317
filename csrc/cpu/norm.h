// CPU entry points of the fused dropout + residual add + norm (see core/norm.h).
#pragma once

#include <cstdint>

#include "core/norm.h"

namespace fused_dropout {

// Runs one forward call on the CPU with the stream (seed, offset).
void norm_forward_cpu(const NormForwardArgs& args, uint64_t seed, uint64_t offset);

// Runs one backward call on the CPU with the forward's (seed, offset).
void norm_backward_cpu(const NormBackwardArgs& args, uint64_t seed, uint64_t offset);

}  // namespace fused_dropout
