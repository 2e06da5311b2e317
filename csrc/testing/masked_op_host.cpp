// C entry points of the host-executed CUDA build (tests/cuda_host.py loads them with ctypes):
// one masked op through the real launcher, masked_op_cuda, under a chosen launch geometry.
// Like every TU of that build, it is compiled with testing/cuda_host.h force-included.
#include <cstdio>
#include <string>

#include "cuda/dropout.h"

namespace {

// One call of masked_op_cuda, as tests/cuda_host.py's HostOp describes it.
struct HostOp {
  int dtype;  // fused_dropout::DType
  const void* input;
  const void* residual;
  const void* bias;
  void* out;
  int64_t numel, bias_len;
  int64_t run, stride, period, mask_numel;  // MaskMap
  int boxed;
  int64_t base, seg, seg_stride;  // MaskMap's box
  double p;
  int scale_by_keep, alpha, backward;
  // The Philox state: (seed, offset) as given, or graph-captured (read through pointers).
  int captured;
  uint64_t seed, offset;
  int64_t* seed_ptr;
  int64_t* offset_ptr;
  uint32_t offset_intragraph;
  const int64_t* pair_in;
  int64_t* pair_out;
  // Geometry (cuda_host::HostConfig) in; what was launched out.
  int sm_count, grid_x;
  int64_t first_block, block_count;
  int launches;
  unsigned grid[3], block[3];
  int resident_blocks;  // the model's occupancy for the kernel launched
};

int report(const std::string& error, char* buffer, int size) {
  if (error.empty()) return 0;
  std::snprintf(buffer, size, "%s", error.c_str());
  return 1;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int fdh_masked_op(HostOp* op, char* error,
                                                                    int error_size) {
  using namespace fused_dropout;
  MaskedOpArgs args;
  args.dtype = static_cast<DType>(op->dtype);
  args.input = op->input;
  args.residual = op->residual;
  args.bias = op->bias;
  args.out = op->out;
  args.numel = op->numel;
  args.bias_len = op->bias_len;
  args.map.run = op->run;
  args.map.stride = op->stride;
  args.map.period = op->period;
  args.map.mask_numel = op->mask_numel;
  args.map.boxed = op->boxed != 0;
  args.map.base = op->base;
  args.map.seg = op->seg;
  args.map.seg_stride = op->seg_stride;
  args.affine = make_affine(op->p, op->scale_by_keep, op->alpha, op->backward);
  const at::PhiloxCudaState philox =
      op->captured ? at::PhiloxCudaState(op->seed_ptr, op->offset_ptr, op->offset_intragraph)
                   : at::PhiloxCudaState(op->seed, op->offset);

  cuda_host::host_config().sm_count = op->sm_count;
  cuda_host::host_config().grid_x = op->grid_x;
  cuda_host::host_config().first_block = op->first_block;
  cuda_host::host_config().block_count = op->block_count;
  cuda_host::LaunchLog& log = cuda_host::launch_log();
  log = {};
  cudaError_t status = cudaSuccess;
  std::string error_text = cuda_host::catch_faults(
      [&] { status = masked_op_cuda(args, philox, op->pair_in, op->pair_out, nullptr); });
  op->launches = log.launches;
  op->grid[0] = log.grid.x, op->grid[1] = log.grid.y, op->grid[2] = log.grid.z;
  op->block[0] = log.block.x, op->block[1] = log.block.y, op->block[2] = log.block.z;
  op->resident_blocks = log.resident_blocks;
  if (error_text.empty()) error_text = log.error;
  if (error_text.empty() && status != cudaSuccess) {
    error_text = "masked_op_cuda returned cudaError " + std::to_string(static_cast<int>(status));
  }
  return report(error_text, error, error_size);
}
