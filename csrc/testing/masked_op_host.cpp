// C entry points of the host-executed CUDA build (tests/cuda_host.py loads them with ctypes):
// one masked op through the real launcher, masked_op_cuda, under a chosen launch geometry.
// Like every TU of that build, it is compiled with testing/cuda_host.h force-included.
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

  const int failed = cuda_host::run_entry(
      op, "masked_op_cuda",
      [&] { return masked_op_cuda(args, philox, op->pair_in, op->pair_out, nullptr); }, error,
      error_size);
  op->resident_blocks = cuda_host::launch_log().resident_blocks;
  return failed;
}
