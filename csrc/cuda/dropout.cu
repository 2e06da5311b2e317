// CUDA kernels of the masked ops: indexing, 16-byte vector I/O and launch
// geometry only. All arithmetic (Philox, threshold, scale, residual, bias)
// comes from core/, the code the CPU test suite executes.
//
// Each thread handles tiles of kTile consecutive elements in a grid-stride loop:
// at least two 16-byte vectors per operand, all loaded before the first use (so
// two loads per operand are in flight), and whole Philox calls (8 elements each):
// fp16/bf16 16 elements (one call per vector), fp32 8 (one per two), fp64 8. The
// mask is a function of the element index alone, so any grid gives the same result.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// <tuple> first: torch 2.6's PhiloxUtils.cuh (detail/UnpackRaw.cuh) uses std::tuple without it.
// clang-format off
#include <tuple>
#include <ATen/cuda/PhiloxUtils.cuh>
// clang-format on
#include <algorithm>

#include "cuda/dropout.h"
#include "cuda/launch.h"
#include "cuda/pairs.h"

namespace fused_dropout {
namespace {

using launch::aligned16;

constexpr int kThreads = 256;
// Blocks of kThreads each multiprocessor must hold at once (registers permitting): 4,
// i.e. 1024 threads (at most 64 registers); 3 where 64 would spill: fp64 with a bias
// (its tiles hold twice the data) and the leading-dims mask kernels of fp64 or with a
// bias (their 64-bit index divisions); 2 for the fp64 leading-dims kernel with a bias, which
// spills at 80 registers since it also maps through a box (MaskMap; a rare variant).
template <DType D, bool kElementwise, bool kBias>
constexpr int kMinBlocks =
    D == DType::kDouble && kBias && !kElementwise                                   ? 2
    : (D == DType::kDouble && (kBias || !kElementwise)) || (kBias && !kElementwise) ? 3
                                                                                    : 4;

// How a dtype is stored and converted on the GPU, on a tile (Vec, below): load_at(t, j)
// gives element j in the compute type, store8(y, t, lo) rounds eight results into
// elements lo .. lo + 7 (the 16-bit types a pair per instruction).
template <DType D>
struct DeviceStorage;

template <typename T>
struct PlainStorage {  // float and double: stored as computed
  using raw = T;
  using acc = T;
  template <typename Tile>
  static __device__ __forceinline__ acc load_at(const Tile& t, int j) {
    return t.e[j];
  }
  template <typename Tile>
  static __device__ __forceinline__ void store8(const acc (&y)[kMaskPerCall], Tile& t, int lo) {
#pragma unroll
    for (int j = 0; j < kMaskPerCall; ++j) t.e[lo + j] = y[j];
  }
};
template <>
struct DeviceStorage<DType::kFloat> : PlainStorage<float> {};
template <>
struct DeviceStorage<DType::kDouble> : PlainStorage<double> {};

template <>
struct DeviceStorage<DType::kHalf> {
  using raw = unsigned short;
  using acc = float;
  template <typename Tile>
  static __device__ __forceinline__ acc load_at(const Tile& t, int j) {
    return __half2float(__ushort_as_half(t.e[j]));
  }
  template <typename Tile>
  static __device__ __forceinline__ void store8(const acc (&y)[kMaskPerCall], Tile& t, int lo) {
#pragma unroll
    for (int j = 0; j < kMaskPerCall; j += 2) {
      t.w[(lo + j) / 2] = pair_bits(__floats2half2_rn(y[j], y[j + 1]));
    }
  }
};
template <>
struct DeviceStorage<DType::kBFloat16> {
  using raw = unsigned short;
  using acc = float;
  // The core's bf16_bits_to_float, from the element's 32-bit word: a high half is not
  // extracted first, only its low bits cleared.
  template <typename Tile>
  static __device__ __forceinline__ acc load_at(const Tile& t, int j) {
    const uint32_t w = t.w[j / 2];
    return __uint_as_float(j % 2 == 0 ? w << 16 : w & 0xFFFF0000u);
  }
  // A pair per instruction, NaN as the core's 0x7FC0 (cuda/pairs.h).
  template <typename Tile>
  static __device__ __forceinline__ void store8(const acc (&y)[kMaskPerCall], Tile& t, int lo) {
    round_bf16_pairs<kMaskPerCall / 2>(y, t.w + lo / 2);
  }
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
  bool bias_tiled;  // every tile's bias lies in one row, 16-byte aligned
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
  uint32_t w[N * sizeof(raw) / sizeof(uint32_t)];
  raw e[N];
};

// A tile of N elements from e0: 16-byte vectors (vector: the tile is whole and
// aligned), else element by element up to numel.
template <typename raw, int N>
__device__ __forceinline__ void load_tile(const raw* src, int64_t e0, int64_t numel, bool vector,
                                          Vec<raw, N>& dst) {
  if (vector) {
    const uint4* p = reinterpret_cast<const uint4*>(src + e0);
#pragma unroll
    for (int q = 0; q < int(sizeof(dst.v) / sizeof(uint4)); ++q) dst.v[q] = p[q];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) dst.e[j] = e0 + j < numel ? src[e0 + j] : raw(0);
  }
}

template <typename raw, int N>
__device__ __forceinline__ void store_tile(raw* dst, int64_t e0, int64_t numel, bool vector,
                                           const Vec<raw, N>& src) {
  if (vector) {
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

// The bias of the N elements from column col on, col advanced past them: one row's
// vectors when the elements lie in one aligned row (bias_tiled), else element by
// element, wrapping at the row's end.
template <DType D, int N>
__device__ __forceinline__ void load_bias(const Params<D>& p, int64_t& col,
                                          Vec<typename DeviceStorage<D>::raw, N>& dst) {
  if (p.bias_tiled) {
    const uint4* src = reinterpret_cast<const uint4*>(p.bias + col);
#pragma unroll
    for (int q = 0; q < int(sizeof(dst.v) / sizeof(uint4)); ++q) dst.v[q] = __ldg(src + q);
    col += N;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      dst.e[j] = __ldg(p.bias + col);
      col = col + 1 == p.bias_len ? 0 : col + 1;
    }
  }
}

// The global mask index of local mask index q (MaskMap's box; q itself without one).
__device__ __forceinline__ uint64_t box_index(const MaskMap& map, int64_t q) {
  return static_cast<uint64_t>(map.boxed ? map.base + (q / map.seg) * map.seg_stride + q % map.seg
                                         : q);
}

// Keep bits of a tile (bit j: element e0 + j) for a mask over leading dims (MaskMap):
// m = (e / run) * stride + e % period, through the box if any, walked element by element
// in a rolled loop (one Philox call per distinct group of 8); a tile inside one run of a
// contiguous layout shares one flag. An element-wise mask in a box (a shard) whose tile lies
// in one segment has consecutive mask indices from m0 = box_index(e0), any m0: the loop then
// walks the tile's Philox groups instead, and the bits are shifted by the head m0 % 8 (a
// 16-byte vector may straddle two groups). One call site of the rule (one inlined Philox)
// serves every case: a second one spills registers.
template <int N>
__device__ __forceinline__ uint32_t keep_broadcast(const PhiloxStream& stream, const KeepRule& rule,
                                                   const MaskMap& map, int64_t e0) {
  const bool groups = map.boxed && map.run == 1 && map.period == 1 && e0 % map.seg + N <= map.seg;
  const uint64_t m0 = groups ? box_index(map, e0) : 0;
  const int head = static_cast<int>(m0 % kMaskPerCall);
  int64_t outer = e0 / map.run;
  int64_t in_run = e0 - outer * map.run;
  int64_t channel = map.period == 1 ? 0 : e0 % map.period;
  // A tile inside one run takes one turn.
  const bool one_flag = map.period == 1 && in_run + N <= map.run;
  const int walk = groups ? (head + N + kMaskPerCall - 1) / kMaskPerCall : one_flag ? 1 : N;
  uint64_t group = ~uint64_t(0), bits = 0;
  uint32_t group_bits = 0;
#pragma unroll 1
  for (int j = 0; j < walk; ++j) {
    const uint64_t m = groups ? m0 - head + uint64_t(kMaskPerCall) * j
                              : box_index(map, outer * map.stride + channel);
    if (m / kMaskPerCall != group) {
      group = m / kMaskPerCall;
      group_bits = keep_bits8(stream, rule, group);
    }
    bits |= groups ? static_cast<uint64_t>(group_bits) << (kMaskPerCall * j)
                   : static_cast<uint64_t>((group_bits >> (m % kMaskPerCall)) & 1u) << j;
    if (++in_run == map.run) in_run = 0, ++outer;
    if (++channel == map.period) channel = 0;
  }
  if (groups) return static_cast<uint32_t>(bits >> head);
  return one_flag ? (bits != 0 ? ~0u : 0u) : static_cast<uint32_t>(bits);
}

// One tile t of N elements, moved as vectors or element by element (the tail, or an
// unaligned operand); col is the bias column of its first element.
template <DType D, bool kElementwise, bool kResidual, bool kBias, bool kShift>
__device__ __forceinline__ void masked_tile(const Params<D>& p, const PhiloxStream& stream,
                                            int64_t t, int64_t col, bool vector) {
  using S = DeviceStorage<D>;
  using raw = typename S::raw;
  using acc = typename S::acc;
  constexpr int N = kTile<D>;
  const int64_t e0 = t * N;
  Vec<raw, N> x, residual, out;
  load_tile(p.x, e0, p.numel, vector, x);
  if constexpr (kResidual) load_tile(p.residual, e0, p.numel, vector, residual);

  // y for the elements [lo, lo + 8) of the tile, keep_of(j) giving element j's flag;
  // called for lo = 0, 8, ... in turn (the bias column follows).
  const auto apply = [&](int lo, auto keep_of) {
    acc y[kMaskPerCall];
    Vec<raw, kMaskPerCall> bias;
    if constexpr (kBias) load_bias<D, kMaskPerCall>(p, col, bias);
#pragma unroll
    for (int j = 0; j < kMaskPerCall; ++j) {
      auto v = S::load_at(x, lo + j);
      if constexpr (kBias) v = add_rn(v, S::load_at(bias, j));
      y[j] = masked_value<kShift>(keep_of(j), v, p.consts);
      if constexpr (kResidual) y[j] = add_rn(y[j], S::load_at(residual, lo + j));
    }
    S::store8(y, out, lo);
  };

  if (p.keep_all) {  // p == 0: every element kept, nothing drawn
#pragma unroll
    for (int lo = 0; lo < N; lo += kMaskPerCall) apply(lo, [](int) { return true; });
  } else if constexpr (kElementwise) {
    // One Philox call per 8 elements, one after the other (which bounds the
    // registers). Without a tie (all but about 8 * 2^-16 of the calls) the first
    // draw decides every element, straight from its number.
#pragma unroll
    for (int lo = 0; lo < N; lo += kMaskPerCall) {
      const uint64_t g = static_cast<uint64_t>((e0 + lo) / kMaskPerCall);
      const PhiloxBlock b = stream.group(g);
      if (__builtin_expect(!block_has_tie(b, p.rule), 1)) {
        apply(lo, [&](int j) { return first_draw_keeps(b, j, p.rule); });
      } else {  // the whole rule, recomputed: sharing nothing keeps it off the common path
        const uint32_t bits = keep_bits8(stream, p.rule, g);
        apply(lo, [&](int j) { return ((bits >> j) & 1u) != 0; });
      }
    }
  } else {  // a mask over leading dims: the tile's keep bits, walked once
    const uint32_t bits = keep_broadcast<N>(stream, p.rule, p.map, e0);
#pragma unroll
    for (int lo = 0; lo < N; lo += kMaskPerCall) {
      apply(lo, [&](int j) { return ((bits >> (lo + j)) & 1u) != 0; });
    }
  }
  store_tile(p.out, e0, p.numel, vector, out);
}

template <DType D, bool kElementwise, bool kResidual, bool kBias, bool kShift>
__global__ void __launch_bounds__(kThreads, kMinBlocks<D, kElementwise, kBias>)
    masked_kernel(const Params<D> p) {
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
  // Tiles that every operand holds whole and 16-byte aligned: moved as vectors.
  const int64_t vector_tiles = p.vectorized ? p.numel / N : 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // The bias column of tile t, advanced with t (one division per thread, not per tile;
  // none for a thread without a tile, whose row may be empty).
  int64_t col = 0, col_step = 0;
  if (kBias && t < tiles) {
    col = t * N % p.bias_len;
    col_step = step * N % p.bias_len;
  }
  const auto advance = [&] {
    t += step;
    if constexpr (kBias) {
      col += col_step;
      if (col >= p.bias_len) col -= p.bias_len;
    }
  };
  for (; t < tiles; advance()) {
    masked_tile<D, kElementwise, kResidual, kBias, kShift>(p, stream, t, col, t < vector_tiles);
  }
}

template <DType D, bool kElementwise, bool kResidual, bool kBias, bool kShift>
void launch_variant(const Params<D>& p, cudaStream_t stream) {
  constexpr auto kernel = masked_kernel<D, kElementwise, kResidual, kBias, kShift>;
  const int64_t tiles = (p.numel + kTile<D> - 1) / kTile<D>;
  kernel<<<launch::grid_for<kernel, kThreads>(tiles, kThreads), kThreads, 0, stream>>>(p);
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
              a.bias_len % kTile<D> == 0 && aligned16(a.bias),
              philox,
              pair_in,
              pair_out};
  // Alpha dropout (the only op with a shift) has neither residual nor bias; a
  // bias comes only with a residual (dropout_add): no kernel adds it without one.
  if (a.bias != nullptr && a.residual == nullptr) return cudaErrorInvalidValue;
  const bool residual = a.residual != nullptr;
  // An element-wise mask in a box (a shard) takes the leading-dims kernels, whose tiles map
  // their mask indices through it.
  if (!a.map.elementwise() || a.map.boxed) {
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
    launch_variant<D, true, true, true, false>(p, stream);
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
