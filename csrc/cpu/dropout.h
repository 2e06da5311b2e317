// CPU entry point of the masked ops (see core/masked_op.h).
#pragma once

#include <cstdint>

#include "core/masked_op.h"
#include "cpu/capability.h"

namespace fused_dropout {

// Runs one masked op on the CPU with the stream (seed, offset).
FD_CPU_KERNEL(masked_op_cpu, void(const MaskedOpArgs& args, uint64_t seed, uint64_t offset))

}  // namespace fused_dropout
