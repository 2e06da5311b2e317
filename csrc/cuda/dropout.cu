// CUDA kernels of the masked ops: indexing, 16-byte vector I/O and launch
// geometry only. All arithmetic (Philox, threshold, scale, residual, bias)
// comes from core/, the code the CPU test suite executes.
//
// Each thread handles units of kUnit consecutive elements (one 16-byte vector,
// and at least one Philox call: 4 elements) in a grid-stride loop. The mask is
// a function of the element index alone, so any grid gives the same result.
#include <cuda_fp16.h>

#include <ATen/cuda/PhiloxUtils.cuh>
#include <algorithm>

#include "cuda/dropout.h"

namespace fused_dropout {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;

// How a dtype is stored and converted on the GPU (raw bits in, compute type out).
template <DType D>
struct DeviceStorage;
template <>
struct DeviceStorage<DType::kFloat> {
  using raw = float;
  using acc = float;
  static __device__ __forceinline__ acc load(raw v) { return v; }
  static __device__ __forceinline__ raw store(acc v) { return v; }
};
template <>
struct DeviceStorage<DType::kDouble> {
  using raw = double;
  using acc = double;
  static __device__ __forceinline__ acc load(raw v) { return v; }
  static __device__ __forceinline__ raw store(acc v) { return v; }
};
template <>
struct DeviceStorage<DType::kHalf> {
  using raw = unsigned short;
  using acc = float;
  static __device__ __forceinline__ acc load(raw v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ raw store(acc v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
template <>
struct DeviceStorage<DType::kBFloat16> {  // the core's conversion: bit-identical to the CPU
  using raw = unsigned short;
  using acc = float;
  static __device__ __forceinline__ acc load(raw v) { return bf16_bits_to_float(v); }
  static __device__ __forceinline__ raw store(acc v) { return float_to_bf16_bits(v); }
};

template <DType D>
struct Params {
  using S = DeviceStorage<D>;
  const typename S::raw* x;
  const typename S::raw* residual;
  const typename S::raw* bias;
  typename S::raw* out;
  int64_t numel;
  int64_t bias_len;
  MaskMap map;
  AffineConsts<typename S::acc> consts;
  uint32_t threshold;
  bool keep_all;
  bool vectorized;  // every streamed pointer is 16-byte aligned
  at::PhiloxCudaState philox;
  const int64_t* pair_in;
  int64_t* pair_out;
};

// Word i (0..3) of a Philox block without dynamic indexing (which would put
// the block in local memory).
__device__ __forceinline__ uint32_t block_word(const PhiloxBlock& b, uint32_t i) {
  return i == 0 ? b.w[0] : i == 1 ? b.w[1] : i == 2 ? b.w[2] : b.w[3];
}

template <typename raw, int N>
union Vec {
  uint4 v[N * sizeof(raw) / sizeof(uint4)];
  raw e[N];
};

template <DType D, int kUnit>
__device__ __forceinline__ void load_unit(const typename DeviceStorage<D>::raw* src, int64_t e0,
                                          int64_t numel, bool vectorized,
                                          Vec<typename DeviceStorage<D>::raw, kUnit>& dst) {
  if (vectorized && e0 + kUnit <= numel) {
    const uint4* p = reinterpret_cast<const uint4*>(src + e0);
#pragma unroll
    for (int q = 0; q < int(sizeof(dst.v) / sizeof(uint4)); ++q) dst.v[q] = p[q];
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) dst.e[j] = e0 + j < numel ? src[e0 + j] : dst.e[j];
  }
}

template <DType D, int kUnit>
__device__ __forceinline__ void store_unit(typename DeviceStorage<D>::raw* dst, int64_t e0,
                                           int64_t numel, bool vectorized,
                                           const Vec<typename DeviceStorage<D>::raw, kUnit>& src) {
  if (vectorized && e0 + kUnit <= numel) {
    uint4* p = reinterpret_cast<uint4*>(dst + e0);
#pragma unroll
    for (int q = 0; q < int(sizeof(src.v) / sizeof(uint4)); ++q) p[q] = src.v[q];
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      if (e0 + j < numel) dst[e0 + j] = src.e[j];
    }
  }
}

// Keep flags of the unit's elements for an element-wise mask: kUnit / 4 Philox calls.
template <int kUnit>
__device__ __forceinline__ void keep_elementwise(const PhiloxStream& stream, uint32_t threshold,
                                                 int64_t e0, bool (&keep)[kUnit]) {
#pragma unroll
  for (int q = 0; q < kUnit / 4; ++q) {
    const PhiloxBlock b = stream.group(static_cast<uint64_t>(e0 / 4 + q));
#pragma unroll
    for (int j = 0; j < 4; ++j) keep[4 * q + j] = keep_word(b.w[j], threshold);
  }
}

// Keep flags for a mask over leading dims (MaskMap): m = (e / run) * stride + e % period,
// walked incrementally; one Philox call per distinct group of 4 mask elements.
template <int kUnit>
__device__ __forceinline__ void keep_broadcast(const PhiloxStream& stream, uint32_t threshold,
                                               const MaskMap& map, int64_t e0,
                                               bool (&keep)[kUnit]) {
  int64_t outer = e0 / map.run;
  int64_t in_run = e0 - outer * map.run;
  int64_t channel = map.period == 1 ? 0 : e0 % map.period;
  uint64_t group = ~uint64_t(0);
  PhiloxBlock b{};
#pragma unroll
  for (int j = 0; j < kUnit; ++j) {
    const uint64_t m = static_cast<uint64_t>(outer * map.stride + channel);
    if (m / 4 != group) {
      group = m / 4;
      b = stream.group(group);
    }
    keep[j] = keep_word(block_word(b, static_cast<uint32_t>(m % 4)), threshold);
    if (++in_run == map.run) in_run = 0, ++outer;
    if (++channel == map.period) channel = 0;
  }
}

template <DType D, bool kElementwise, bool kResidual, bool kBias, bool kShift>
__global__ void __launch_bounds__(kThreads) masked_kernel(const Params<D> p) {
  using S = DeviceStorage<D>;
  using raw = typename S::raw;
  constexpr int kVecElems = int(sizeof(uint4) / sizeof(raw));
  constexpr int kUnit = kVecElems < 4 ? 4 : kVecElems;

  uint64_t seed, offset;
  if (p.pair_in != nullptr) {
    seed = static_cast<uint64_t>(p.pair_in[0]);
    offset = static_cast<uint64_t>(p.pair_in[1]);
  } else {
    const auto pair = at::cuda::philox::unpack(p.philox);
    seed = std::get<0>(pair);
    offset = std::get<1>(pair);
    if (p.pair_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
      p.pair_out[0] = static_cast<int64_t>(seed);
      p.pair_out[1] = static_cast<int64_t>(offset);
    }
  }
  const PhiloxStream stream = PhiloxStream::make(seed, offset);

  const int64_t units = (p.numel + kUnit - 1) / kUnit;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
       u += step) {
    const int64_t e0 = u * kUnit;
    Vec<raw, kUnit> x, residual, out;
    load_unit<D, kUnit>(p.x, e0, p.numel, p.vectorized, x);
    if constexpr (kResidual) load_unit<D, kUnit>(p.residual, e0, p.numel, p.vectorized, residual);

    bool keep[kUnit];
    if (p.keep_all) {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) keep[j] = true;
    } else if constexpr (kElementwise) {
      keep_elementwise<kUnit>(stream, p.threshold, e0, keep);
    } else {
      keep_broadcast<kUnit>(stream, p.threshold, p.map, e0, keep);
    }

    int64_t col = kBias ? e0 % p.bias_len : 0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      auto v = S::load(x.e[j]);
      if constexpr (kBias) {
        v = add_rn(v, S::load(__ldg(p.bias + col)));
        col = col + 1 == p.bias_len ? 0 : col + 1;
      }
      auto y = masked_value<kShift>(keep[j], v, p.consts);
      if constexpr (kResidual) y = add_rn(y, S::load(residual.e[j]));
      out.e[j] = S::store(y);
    }
    store_unit<D, kUnit>(p.out, e0, p.numel, p.vectorized, out);
  }
}

// Multiprocessors of the current device, queried once per device.
int sm_count() {
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

bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

template <DType D, bool kElementwise, bool kResidual, bool kBias, bool kShift>
void launch_variant(const Params<D>& p, cudaStream_t stream) {
  constexpr int kUnit = std::max<int>(4, int(16 / sizeof(typename DeviceStorage<D>::raw)));
  const int64_t units = (p.numel + kUnit - 1) / kUnit;
  const int64_t wanted = (units + kThreads - 1) / kThreads;
  // At least one block: for an empty tensor it still writes the pair.
  const int blocks =
      static_cast<int>(std::clamp<int64_t>(wanted, 1, int64_t(sm_count()) * kBlocksPerSm));
  masked_kernel<D, kElementwise, kResidual, kBias, kShift><<<blocks, kThreads, 0, stream>>>(p);
}

template <DType D>
cudaError_t launch_typed(const MaskedOpArgs& a, at::PhiloxCudaState philox, const int64_t* pair_in,
                         int64_t* pair_out, cudaStream_t stream) {
  using S = DeviceStorage<D>;
  using raw = typename S::raw;
  Params<D> p{static_cast<const raw*>(a.input),
              static_cast<const raw*>(a.residual),
              static_cast<const raw*>(a.bias),
              static_cast<raw*>(a.out),
              a.numel,
              a.bias_len,
              a.map,
              AffineConsts<typename S::acc>::make(a.affine),
              a.affine.threshold,
              a.affine.keep_all,
              aligned16(a.input) && aligned16(a.residual) && aligned16(a.out),
              philox,
              pair_in,
              pair_out};
  // Alpha dropout (the only op with a shift) has neither residual nor bias; a
  // bias comes only with a residual (dropout_add).
  const bool residual = a.residual != nullptr;
  if (!a.map.elementwise()) {
    if (a.affine.has_shift) {
      launch_variant<D, false, false, false, true>(p, stream);
    } else if (a.bias != nullptr) {
      launch_variant<D, false, true, true, false>(p, stream);
    } else if (residual) {
      launch_variant<D, false, true, false, false>(p, stream);
    } else {
      launch_variant<D, false, false, false, false>(p, stream);
    }
  } else if (a.affine.has_shift) {
    launch_variant<D, true, false, false, true>(p, stream);
  } else if (a.bias != nullptr) {
    residual ? launch_variant<D, true, true, true, false>(p, stream)
             : launch_variant<D, true, false, true, false>(p, stream);
  } else {
    residual ? launch_variant<D, true, true, false, false>(p, stream)
             : launch_variant<D, true, false, false, false>(p, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_op_cuda(const MaskedOpArgs& args, at::PhiloxCudaState philox,
                           const int64_t* pair_in, int64_t* pair_out, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat:
      return launch_typed<DType::kFloat>(args, philox, pair_in, pair_out, stream);
    case DType::kDouble:
      return launch_typed<DType::kDouble>(args, philox, pair_in, pair_out, stream);
    case DType::kHalf:
      return launch_typed<DType::kHalf>(args, philox, pair_in, pair_out, stream);
    case DType::kBFloat16:
      return launch_typed<DType::kBFloat16>(args, philox, pair_in, pair_out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fused_dropout
