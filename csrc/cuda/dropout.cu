// CUDA kernels of the masked ops: indexing, 16-byte vector I/O and launch
// geometry only. All arithmetic (Philox, threshold, scale, residual, bias)
// comes from core/, the code the CPU test suite executes.
//
// Each thread handles tiles of kTile consecutive elements in a grid-stride loop:
// at least two 16-byte vectors per operand, all loaded before the first use (so
// two loads per operand are in flight), and whole Philox calls (8 elements each):
// fp16/bf16 16 elements (one call per vector), fp32 8 (one per two), fp64 8. The
// mask is a function of the element index alone, so any grid gives the same result.
#include <cuda_fp16.h>

#include <ATen/cuda/PhiloxUtils.cuh>
#include <algorithm>

#include "cuda/dropout.h"

namespace fused_dropout {
namespace {

constexpr int kThreads = 256;
// Blocks of kThreads each multiprocessor must hold at once (registers permitting): 4,
// i.e. 1024 threads (at most 64 registers); 3 where 64 would spill (fp64, whose tiles
// hold twice the data, and the bias loads).
template <DType D, bool kBias>
constexpr int kMinBlocks = D == DType::kDouble || kBias ? 3 : 4;

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
  KeepRule rule;
  bool keep_all;
  bool vectorized;  // every streamed pointer is 16-byte aligned
  at::PhiloxCudaState philox;
  const int64_t* pair_in;
  int64_t* pair_out;
};

// Elements per thread tile of a dtype (see the top of the file).
template <DType D>
constexpr int kTile =
    std::max<int>(2 * int(16 / sizeof(typename DeviceStorage<D>::raw)), kMaskPerCall);

template <typename raw, int N>
union Vec {
  uint4 v[N * sizeof(raw) / sizeof(uint4)];
  raw e[N];
};

template <typename raw, int N>
__device__ __forceinline__ void load_tile(const raw* src, int64_t e0, int64_t numel,
                                          bool vectorized, Vec<raw, N>& dst) {
  if (vectorized && e0 + N <= numel) {
    const uint4* p = reinterpret_cast<const uint4*>(src + e0);
#pragma unroll
    for (int q = 0; q < int(sizeof(dst.v) / sizeof(uint4)); ++q) dst.v[q] = p[q];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) dst.e[j] = e0 + j < numel ? src[e0 + j] : dst.e[j];
  }
}

template <typename raw, int N>
__device__ __forceinline__ void store_tile(raw* dst, int64_t e0, int64_t numel, bool vectorized,
                                           const Vec<raw, N>& src) {
  if (vectorized && e0 + N <= numel) {
    uint4* p = reinterpret_cast<uint4*>(dst + e0);
#pragma unroll
    for (int q = 0; q < int(sizeof(src.v) / sizeof(uint4)); ++q) p[q] = src.v[q];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (e0 + j < numel) dst[e0 + j] = src.e[j];
    }
  }
}

// Keep bits of a tile (bit j: element e0 + j) for a mask over leading dims (MaskMap):
// m = (e / run) * stride + e % period, walked element by element in a rolled loop
// (one Philox call per distinct group of 8); a tile inside one run of a contiguous
// layout shares one flag.
template <int N>
__device__ __forceinline__ uint32_t keep_broadcast(const PhiloxStream& stream, const KeepRule& rule,
                                                   const MaskMap& map, int64_t e0) {
  int64_t outer = e0 / map.run;
  int64_t in_run = e0 - outer * map.run;
  int64_t channel = map.period == 1 ? 0 : e0 % map.period;
  // One call site of the rule (one inlined Philox): a tile inside one run takes one turn.
  const bool one_flag = map.period == 1 && in_run + N <= map.run;
  const int walk = one_flag ? 1 : N;
  uint64_t group = ~uint64_t(0);
  uint32_t group_bits = 0, bits = 0;
#pragma unroll 1
  for (int j = 0; j < walk; ++j) {
    const uint64_t m = static_cast<uint64_t>(outer * map.stride + channel);
    if (m / kMaskPerCall != group) {
      group = m / kMaskPerCall;
      group_bits = keep_bits8(stream, rule, group);
    }
    bits |= ((group_bits >> (m % kMaskPerCall)) & 1u) << j;
    if (++in_run == map.run) in_run = 0, ++outer;
    if (++channel == map.period) channel = 0;
  }
  if (one_flag) bits = bits != 0 ? ~0u : 0u;
  return bits;
}

template <DType D, bool kElementwise, bool kResidual, bool kBias, bool kShift>
__global__ void __launch_bounds__(kThreads, kMinBlocks<D, kBias>) masked_kernel(const Params<D> p) {
  using S = DeviceStorage<D>;
  using raw = typename S::raw;
  constexpr int N = kTile<D>;

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

  const int64_t tiles = (p.numel + N - 1) / N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < tiles;
       t += step) {
    const int64_t e0 = t * N;
    Vec<raw, N> x, residual, out;
    load_tile(p.x, e0, p.numel, p.vectorized, x);
    if constexpr (kResidual) load_tile(p.residual, e0, p.numel, p.vectorized, residual);

    // y for the elements [lo, lo + n) of the tile, keep_of(j) giving element j's flag.
    int64_t col = kBias ? e0 % p.bias_len : 0;  // the bias column, advanced by apply
    const auto apply = [&](int lo, int n, auto keep_of) {
#pragma unroll
      for (int j = lo; j < lo + n; ++j) {
        auto v = S::load(x.e[j]);
        if constexpr (kBias) {
          v = add_rn(v, S::load(__ldg(p.bias + col)));
          col = col + 1 == p.bias_len ? 0 : col + 1;
        }
        auto y = masked_value<kShift>(keep_of(j), v, p.consts);
        if constexpr (kResidual) y = add_rn(y, S::load(residual.e[j]));
        out.e[j] = S::store(y);
      }
    };

    if (p.keep_all) {  // p == 0: every element kept, nothing drawn
      apply(0, N, [](int) { return true; });
    } else if constexpr (kElementwise) {
      // One Philox call per 8 elements, one after the other (which bounds the
      // registers). Without a tie (all but about 8 * 2^-16 of the calls) the first
      // draw decides every element, straight from its number.
#pragma unroll
      for (int q = 0; q < N / kMaskPerCall; ++q) {
        const uint64_t g = static_cast<uint64_t>(e0 / kMaskPerCall + q);
        const PhiloxBlock b = stream.group(g);
        const int lo = kMaskPerCall * q;
        if (__builtin_expect(!block_has_tie(b, p.rule), 1)) {
          apply(lo, kMaskPerCall,
                [&](int j) { return first_draw_keeps(block_half(b, j - lo), p.rule); });
        } else {  // the whole rule, recomputed: sharing nothing keeps it off the common path
          const uint32_t bits = keep_bits8(stream, p.rule, g);
          apply(lo, kMaskPerCall, [&](int j) { return ((bits >> (j - lo)) & 1u) != 0; });
        }
      }
    } else {
      const uint32_t bits = keep_broadcast<N>(stream, p.rule, p.map, e0);
      apply(0, N, [&](int j) { return ((bits >> j) & 1u) != 0; });
    }
    store_tile(p.out, e0, p.numel, p.vectorized, out);
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

// Blocks of the kernel resident per multiprocessor at its register count, queried
// once per device: the grid fills the device and no more.
template <typename Kernel>
int resident_blocks(Kernel kernel) {
  constexpr int kMaxDevices = 64;
  static int blocks[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= kMaxDevices) return 1;
  if (blocks[device] == 0) {
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0);
    blocks[device] = std::max(n, 1);
  }
  return blocks[device];
}

template <DType D, bool kElementwise, bool kResidual, bool kBias, bool kShift>
void launch_variant(const Params<D>& p, cudaStream_t stream) {
  const auto kernel = masked_kernel<D, kElementwise, kResidual, kBias, kShift>;
  const int64_t tiles = (p.numel + kTile<D> - 1) / kTile<D>;
  const int64_t wanted = (tiles + kThreads - 1) / kThreads;
  const int64_t full = int64_t(sm_count()) * resident_blocks(kernel);
  // At least one block: for an empty tensor it still writes the pair.
  kernel<<<static_cast<int>(std::clamp<int64_t>(wanted, 1, full)), kThreads, 0, stream>>>(p);
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
              KeepRule::make(a.affine.threshold),
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
