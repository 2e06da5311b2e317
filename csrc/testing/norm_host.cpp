// C entry point of the host-executed CUDA build for the fused dropout + add + norm
// (tests/cuda_host.py loads it with ctypes): one forward or backward call through the real
// launchers, norm_forward_cuda / norm_backward_cuda, under a chosen launch geometry.
// Like every TU of that build, it is compiled with testing/cuda_host.h force-included.
#include "cuda/norm.h"

namespace {

// One call, as tests/cuda_host.py's _HostNorm describes it.
struct HostNorm {
  int backward;
  int dtype;  // fused_dropout::DType
  int wide_h, weight_fp32, rms, saved_is_y;
  const void* input;  // forward
  const void* residual;
  const void* input_bias;
  const void* weight;
  const void* bias;
  void* y;
  void* h;
  void* mean;
  void* rstd;
  const void* dy;  // backward (mean and rstd read from the pointers above)
  const void* dh_in;
  const void* saved;
  void* grad_input;
  void* grad_h;
  void* grad_weight;
  void* grad_bias;
  void* grad_input_bias;
  void* partials;
  int64_t rows, cols, rows_per_sample;
  double eps, p;
  uint64_t seed, offset;   // forward: the Philox state's pair
  int64_t* pair_out;       // forward
  const int64_t* pair_in;  // backward
  int sm_count, grid_x;
  int64_t first_block, block_count;
  int launches;
  unsigned grid[3], block[3];
};

}  // namespace

extern "C" __attribute__((visibility("default"))) int fdh_norm(HostNorm* op, char* error,
                                                               int error_size) {
  using namespace fused_dropout;
  if (op->backward) {
    NormBackwardArgs a;
    a.dtype = static_cast<DType>(op->dtype);
    a.wide_h = op->wide_h, a.weight_fp32 = op->weight_fp32, a.rms = op->rms;
    a.dy = op->dy, a.dh_in = op->dh_in, a.saved = op->saved, a.saved_is_y = op->saved_is_y;
    a.weight = op->weight, a.bias = op->bias, a.mean = op->mean, a.rstd = op->rstd;
    a.grad_input = op->grad_input, a.grad_h = op->grad_h, a.grad_weight = op->grad_weight;
    a.grad_bias = op->grad_bias, a.grad_input_bias = op->grad_input_bias;
    a.partials = op->partials;
    a.rows = op->rows, a.cols = op->cols, a.rows_per_sample = op->rows_per_sample;
    a.affine = make_affine(op->p, true, false, true);
    return cuda_host::run_entry(
        op, "norm_backward_cuda", [&] { return norm_backward_cuda(a, op->pair_in, nullptr); },
        error, error_size);
  }
  NormForwardArgs a;
  a.dtype = static_cast<DType>(op->dtype);
  a.wide_h = op->wide_h, a.weight_fp32 = op->weight_fp32, a.rms = op->rms;
  a.input = op->input, a.residual = op->residual, a.input_bias = op->input_bias;
  a.weight = op->weight, a.bias = op->bias;
  a.y = op->y, a.h = op->h, a.mean = op->mean, a.rstd = op->rstd;
  a.rows = op->rows, a.cols = op->cols, a.rows_per_sample = op->rows_per_sample;
  a.eps = op->eps;
  a.affine = make_affine(op->p, true, false, false);
  const at::PhiloxCudaState philox(op->seed, op->offset);
  return cuda_host::run_entry(
      op, "norm_forward_cuda", [&] { return norm_forward_cuda(a, philox, op->pair_out, nullptr); },
      error, error_size);
}
