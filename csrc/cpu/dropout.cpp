// CPU loops of every masked op: at::parallel_for over blocks of elements,
// each block drawing its Philox words in a batch the compiler vectorizes and
// then applying core/masked_op.h's per-element arithmetic.
#include "cpu/dropout.h"

#include <algorithm>
#include <type_traits>

#include "cpu/keep_bits.h"
#include "cpu/vec.h"

namespace fused_dropout {
namespace FD_CPU_NS {  // a kernel file (cpu/capability.h): compiled once per CPU capability
namespace {

// Work per parallel task; below this the call runs inline on one thread.
constexpr int64_t kGrainElements = 1 << 15;

// The 16-bit float types, as tags: they are stored as uint16_t.
struct Half;
struct BFloat16;

// How a dtype is stored and converted on the CPU. fp16 and bf16 go through the
// core's bit-level conversions, which the compiler vectorizes (c10's bf16 does not).
template <typename scalar_t>
struct Storage {
  using raw = scalar_t;
  using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static acc load(raw v) { return static_cast<acc>(v); }
  static raw store(acc v) { return static_cast<raw>(v); }
};

template <>
struct Storage<BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return bf16_bits_to_float(v); }
  static raw store(acc v) { return float_to_bf16_bits(v); }
};

template <>
struct Storage<Half> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return half_bits_to_float(v); }
  static raw store(acc v) { return float_to_half_bits(v); }
};

#ifdef FD_CPU_BLOCK_KERNEL
template <typename scalar_t>
constexpr bool kBlockKernel = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>;

// The first kCount elements of a block (a multiple of 64); bias, when kBias, is the
// block's slice of the bias (the block is inside one row).
template <bool kResidual, bool kBias, int64_t kCount = kBlock, typename raw>
void apply_block(const raw* x, const raw* residual, const raw* bias, raw* out, const KeepBits& bits,
                 float scale) {
  static_assert(kCount % 64 == 0 && kCount <= kBlock);
  const FVec s = splat(scale);
  constexpr int kPerWord = 64 / kVecLanes;
  for (int q = 0; q < kCount / kVecLanes; ++q) {
    const int e = kVecLanes * q;
    FVec v = load_vec(x + e);
    if constexpr (kBias) v = add_vec(v, load_vec(bias + e));
    const uint32_t k = static_cast<uint32_t>(bits.w[q / kPerWord] >> (kVecLanes * (q % kPerWord)));
    FVec y = keep_mul(k & ((1u << kVecLanes) - 1), v, s);
    if constexpr (kResidual) y = add_vec(y, load_vec(residual + e));
    store_vec(out + e, y);
  }
}
#endif

// The operands of one call, typed.
template <typename scalar_t>
struct Operands {
  using S = Storage<scalar_t>;
  const typename S::raw* x;
  const typename S::raw* residual;
  const typename S::raw* bias;
  typename S::raw* out;
  int64_t bias_len;
  AffineConsts<typename S::acc> consts;
};

// Elements [i, i + len): keep flag keep[k] (kPerElementKeep) or keep[0] for all.
// The bias, if any, starts at column col and does not wrap inside the segment.
// Out of line: inlined into the parallel loops, GCC does not vectorize it for AVX2.
template <bool kPerElementKeep, bool kResidual, bool kBias, bool kShift, typename scalar_t>
__attribute__((noinline)) void apply_segment(const Operands<scalar_t>& o, int64_t i, int64_t len,
                                             const uint8_t* keep, int64_t col) {
  using S = Storage<scalar_t>;
  // Locals, not loads through `o`: a store to out could alias `o` as far as
  // the compiler knows, which would stop it from vectorizing the loop.
  const AffineConsts<typename S::acc> consts = o.consts;
  const auto* x = o.x + i;
  const auto* residual = o.residual + i;
  const auto* bias = o.bias + col;
  auto* out = o.out + i;  // may be x itself (in place): each element is read, then written
#if defined(__clang__)
#pragma clang loop vectorize(assume_safety)
#elif defined(__GNUC__)
#pragma GCC ivdep
#endif
  for (int64_t k = 0; k < len; ++k) {
    auto v = S::load(x[k]);
    if constexpr (kBias) v = add_rn(v, S::load(bias[k]));
    auto y = masked_value<kShift>(static_cast<bool>(keep[kPerElementKeep ? k : 0]), v, consts);
    if constexpr (kResidual) y = add_rn(y, S::load(residual[k]));
    out[k] = S::store(y);
  }
}

// Elements [e0, e0 + n) with keep flags keep[0 .. n), split at row ends when there is a
// bias so that it never wraps inside a segment.
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void apply_keep(const Operands<scalar_t>& o, int64_t e0, int64_t n, const uint8_t* keep) {
  if constexpr (!kBias) {
    apply_segment<true, kResidual, false, kShift>(o, e0, n, keep, 0);
  } else {
    for (int64_t k = 0; k < n;) {
      const int64_t col = (e0 + k) % o.bias_len;
      const int64_t len = std::min(n - k, o.bias_len - col);
      apply_segment<true, kResidual, true, kShift>(o, e0 + k, len, keep + k, col);
      k += len;
    }
  }
}

// Element-wise mask: one Philox batch per block of kBlock elements. The elements come in
// segments whose mask indices are consecutive (one segment without a box; rows of the box,
// MaskMap, with one): segment s holds elements [s * seg, ...) from mask index
// base + s * seg_stride. A segment is a head, up to the next multiple of 8 in the mask (drawn
// from its group and peeled off), then blocks whose mask indices start at multiples of 8, so
// the SIMD paths draw whole Philox groups whatever the base.
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void run_elementwise(const Operands<scalar_t>& o, const MaskedOpArgs& a, const LaneStream& stream) {
  const MaskMap& map = a.map;
  const int64_t seg = map.boxed ? map.seg : a.numel;
  const int64_t nseg = (a.numel + seg - 1) / seg;
  const int64_t chunks = 1 + (seg + kBlock - 1) / kBlock;  // the head, then the blocks
  parallel_for(0, nseg * chunks, kGrainElements / kBlock, [&](int64_t t0, int64_t t1) {
    alignas(64) uint8_t keep[kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / chunks, c = t % chunks;
      const int64_t seg_begin = s * seg;
      const int64_t seg_end = std::min(seg_begin + seg, a.numel);
      const int64_t m_begin = map.boxed ? map.base + s * map.seg_stride : 0;
      const int64_t head =
          std::min(seg_end - seg_begin, (kMaskPerCall - m_begin % kMaskPerCall) % kMaskPerCall);
      if (c == 0) {
        if (head > 0) {
          const int64_t into = m_begin % kMaskPerCall;
          draw_keep_block(stream, a.affine, m_begin - into, keep);
          apply_keep<kResidual, kBias, kShift>(o, seg_begin, head, keep + into);
        }
        continue;
      }
      const int64_t e0 = seg_begin + head + (c - 1) * kBlock;
      if (e0 >= seg_end) continue;
      const int64_t m0 = m_begin + head + (c - 1) * kBlock;  // a multiple of 8
      const int64_t n = std::min(kBlock, seg_end - e0);
#ifdef FD_CPU_BLOCK_KERNEL
      if constexpr (kBlockKernel<scalar_t> && !kShift) {
        const int64_t col = kBias ? e0 % o.bias_len : 0;
        if (n == kBlock && (!kBias || col + kBlock <= o.bias_len)) {
          const KeepBits bits = keep_bits(stream, a.affine, m0);
          apply_block<kResidual, kBias>(o.x + e0, kResidual ? o.residual + e0 : nullptr,
                                        kBias ? o.bias + col : nullptr, o.out + e0, bits,
                                        o.consts.scale);
          continue;
        }
      }
#endif
      draw_keep_block(stream, a.affine, m0, keep);
      apply_keep<kResidual, kBias, kShift>(o, e0, n, keep);
    }
  });
}

// keep[j] for the global mask indices [m, m + n), any m: from whole blocks drawn at
// multiples of 8.
void draw_keep_range(const LaneStream& stream, const MaskedAffine& a, int64_t m, int64_t n,
                     uint8_t* keep) {
  alignas(64) uint8_t block[kBlock];
  while (n > 0) {
    const int64_t into = m % kMaskPerCall;
    draw_keep_block(stream, a, m - into, block);
    const int64_t len = std::min(n, kBlock - into);
    std::copy(block + into, block + into + len, keep);
    keep += len, m += len, n -= len;
  }
}

// keep[j] for the local mask indices [q0, q0 + kBlock) (q0 a multiple of kBlock; those past
// mask_numel are left as they are): through the box when there is one.
void draw_keep_local(const LaneStream& stream, const MaskedAffine& a, const MaskMap& map,
                     int64_t q0, uint8_t* keep) {
  if (!map.boxed) return draw_keep_block(stream, a, q0, keep);
  const int64_t q1 = std::min(q0 + kBlock, map.mask_numel);
  for (int64_t q = q0; q < q1;) {
    const int64_t s = q / map.seg, in = q % map.seg;
    const int64_t len = std::min(q1 - q, map.seg - in);
    draw_keep_range(stream, a, map.base + s * map.seg_stride + in, len, keep + (q - q0));
    q += len;
  }
}

// Mask over leading dims: draw all mask_numel flags once (one Philox call per
// 8 mask elements; through the box, if any), then stream the elements in runs that share a flag
// (contiguous) or walk the channels of each position (channels-last; never
// with a bias, which needs the contiguous layout).
template <bool kResidual, bool kBias, bool kShift, typename scalar_t>
void run_broadcast(const Operands<scalar_t>& o, const MaskedOpArgs& a, const LaneStream& stream) {
  const MaskMap& map = a.map;
  const int64_t nblocks = (map.mask_numel + kBlock - 1) / kBlock;
  Vector<uint8_t> keep(nblocks * kBlock);
  parallel_for(0, nblocks, kGrainElements / kBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      draw_keep_local(stream, a.affine, map, b * kBlock, &keep[b * kBlock]);
    }
  });
  parallel_for(0, a.numel, kGrainElements, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t outer = i / map.run;
      if (map.period == 1) {
        int64_t len = std::min(i1, (outer + 1) * map.run) - i;
        const int64_t col = kBias ? i % o.bias_len : 0;
        if (kBias) len = std::min(len, o.bias_len - col);
        const uint8_t* flag = &keep[outer * map.stride];
#ifdef FD_CPU_BLOCK_KERNEL
        if constexpr (kBlockKernel<scalar_t> && !kShift && !kBias) {
          // The whole run shares one flag: full batches as masked multiplies.
          KeepBits bits;
          for (auto& w : bits.w) w = *flag ? ~uint64_t(0) : 0;
          for (; len >= kBatch; len -= kBatch, i += kBatch) {
            apply_block<kResidual, false, kBatch>(o.x + i, kResidual ? o.residual + i : nullptr,
                                                  o.bias, o.out + i, bits, o.consts.scale);
          }
        }
#endif
        apply_segment<false, kResidual, kBias, kShift>(o, i, len, flag, col);
        i += len;
      } else {
        const int64_t c = i % map.period;
        const int64_t len = std::min(i1 - i, map.period - c);
        apply_segment<true, kResidual, false, kShift>(o, i, len, &keep[outer * map.stride + c], 0);
        i += len;
      }
    }
  });
}

template <typename scalar_t>
void run_typed(const MaskedOpArgs& a, const LaneStream& stream) {
  using S = Storage<scalar_t>;
  using raw = typename S::raw;
  const Operands<scalar_t> o{static_cast<const raw*>(a.input),
                             static_cast<const raw*>(a.residual),
                             static_cast<const raw*>(a.bias),
                             static_cast<raw*>(a.out),
                             a.bias_len,
                             AffineConsts<typename S::acc>::make(a.affine)};
  // Alpha dropout (the only op with a shift) has neither residual nor bias; a bias
  // comes only with a residual (dropout_add).
  const bool residual = a.residual != nullptr;
  if (!a.map.elementwise()) {
    if (a.affine.has_shift) return run_broadcast<false, false, true>(o, a, stream);
    if (a.bias != nullptr) return run_broadcast<true, true, false>(o, a, stream);
    residual ? run_broadcast<true, false, false>(o, a, stream)
             : run_broadcast<false, false, false>(o, a, stream);
  } else if (a.affine.has_shift) {
    run_elementwise<false, false, true>(o, a, stream);
  } else if (a.bias != nullptr) {
    residual ? run_elementwise<true, true, false>(o, a, stream)
             : run_elementwise<false, true, false>(o, a, stream);
  } else {
    residual ? run_elementwise<true, false, false>(o, a, stream)
             : run_elementwise<false, false, false>(o, a, stream);
  }
}

}  // namespace

void masked_op_cpu(const MaskedOpArgs& args, uint64_t seed, uint64_t offset) {
  if (args.numel == 0) return;
  const LaneStream stream(PhiloxStream::make(seed, offset));
  switch (args.dtype) {
    case DType::kFloat:
      return run_typed<float>(args, stream);
    case DType::kDouble:
      return run_typed<double>(args, stream);
    case DType::kHalf:
      return run_typed<Half>(args, stream);
    case DType::kBFloat16:
      return run_typed<BFloat16>(args, stream);
  }
}

}  // namespace FD_CPU_NS
}  // namespace fused_dropout
