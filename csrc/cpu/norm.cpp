// CPU loops of the fused dropout + residual add + norm: parallel_for over rows (forward)
// and over the column sums' blocks of rows (backward), calling core/norm.h's arithmetic and
// summing in the contract's order (core/norm.h): stripes of 256 consecutive elements added
// into a 256-wide accumulator per group, then the fixed tree.
#include "cpu/norm.h"

#include <algorithm>
#include <type_traits>

#include "cpu/keep_bits.h"

namespace fused_dropout {
namespace FD_CPU_NS {  // a kernel file (cpu/capability.h): compiled once per CPU capability
namespace {

// Work per parallel task; below this the call runs inline on one thread.
constexpr int64_t kGrainElements = 1 << 15;

// How a dtype is stored and converted on the CPU; fp16 and bf16 through the core's bit-level
// conversions (which the compiler vectorizes).
template <DType D>
struct Stored;
template <>
struct Stored<DType::kFloat> {
  using raw = float;
  using acc = float;
  static acc load(raw v) { return v; }
  static raw store(acc v) { return v; }
};
template <>
struct Stored<DType::kDouble> {
  using raw = double;
  using acc = double;
  static acc load(raw v) { return v; }
  static raw store(acc v) { return v; }
};
template <>
struct Stored<DType::kHalf> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return half_bits_to_float(v); }
  static raw store(acc v) { return float_to_half_bits(v); }
};
template <>
struct Stored<DType::kBFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw v) { return bf16_bits_to_float(v); }
  static raw store(acc v) { return float_to_bf16_bits(v); }
};

// The row sums of the contract, N at once: S(f_k(i)) for i < n, f(i, v) setting v[k].
template <typename acc_t, int N>
struct RowSums {
  alignas(64) acc_t a[N][kMaxGroups * kStripe];

  template <typename F>
  void run(int64_t n, F f, acc_t (&out)[N]) {
    const int groups = norm_groups(n);
    for (int k = 0; k < N; ++k) std::fill(a[k], a[k] + groups * kStripe, acc_t(0));
    for (int64_t s0 = 0, s = 0; s0 < n; s0 += kStripe, ++s) {
      const int64_t base = (s % groups) * kStripe;
      const int64_t len = std::min<int64_t>(kStripe, n - s0);
      for (int64_t j = 0; j < len; ++j) {
        acc_t v[N];
        f(s0 + j, v);
        for (int k = 0; k < N; ++k) a[k][base + j] = add_rn(a[k][base + j], v[k]);
      }
    }
    for (int k = 0; k < N; ++k) out[k] = tree(a[k], groups);
  }

  // Each lane's 8 accumulators, then the lanes, then the groups (core/norm.h).
  static acc_t tree(const acc_t* acc, int groups) {
    acc_t per_group[kMaxGroups];
    for (int g = 0; g < groups; ++g) {
      acc_t lanes[kLanes];
      for (int t = 0; t < kLanes; ++t) {
        lanes[t] =
            chunk_tree(*reinterpret_cast<const acc_t(*)[kChunk]>(acc + g * kStripe + t * kChunk));
      }
      per_group[g] = halving_tree(lanes, kLanes);
    }
    return halving_tree(per_group, groups);
  }
};

// The keep flags of row r: element-wise (mask indices r * cols ..) or one per sample.
void row_keep(KeepRange& range, int64_t r, int64_t cols, int64_t rows_per_sample, uint8_t* keep) {
  if (rows_per_sample > 0) {
    range.flags(r / rows_per_sample, 1, keep);
    std::fill(keep + 1, keep + cols, keep[0]);
  } else {
    range.flags(r * cols, cols, keep);
  }
}

// A [cols] vector of the call (weight, bias, input_bias) in the compute type, or `neutral`
// where it is absent: 1 for a weight, -0 for a bias (x * 1 and x + -0 are x, bit for bit).
template <typename acc_t, DType D>
Vector<acc_t> row_vector(const void* p, bool fp32, int64_t cols, acc_t neutral) {
  Vector<acc_t> out(cols, neutral);
  if (p == nullptr) return out;
  for (int64_t c = 0; c < cols; ++c) {
    out[c] = fp32 ? static_cast<acc_t>(static_cast<const float*>(p)[c])
                  : static_cast<acc_t>(
                        Stored<D>::load(static_cast<const typename Stored<D>::raw*>(p)[c]));
  }
  return out;
}

// A compiled variant: the dtype, h in fp32 (residual_in_fp32), RMSNorm.
template <DType D, bool kWide, bool kRms>
struct Variant {};

// fn(Variant<...>{}) for the call's dtype and flags (wide only for the 16-bit dtypes).
template <typename Fn>
void dispatch(DType dtype, bool wide, bool rms, Fn&& fn) {
  const auto by_flags = [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    if constexpr (D == DType::kHalf || D == DType::kBFloat16) {
      if (wide) return rms ? fn(Variant<D, true, true>{}) : fn(Variant<D, true, false>{});
    }
    return rms ? fn(Variant<D, false, true>{}) : fn(Variant<D, false, false>{});
  };
  switch (dtype) {
    case DType::kFloat:
      return by_flags(std::integral_constant<DType, DType::kFloat>{});
    case DType::kDouble:
      return by_flags(std::integral_constant<DType, DType::kDouble>{});
    case DType::kHalf:
      return by_flags(std::integral_constant<DType, DType::kHalf>{});
    case DType::kBFloat16:
      return by_flags(std::integral_constant<DType, DType::kBFloat16>{});
  }
}

template <DType D, bool kWide, bool kRms>
void forward_typed(Variant<D, kWide, kRms>, const NormForwardArgs& a, const LaneStream& stream) {
  using S = Stored<D>;
  using Hs = Stored<kWide ? DType::kFloat : D>;
  using raw = typename S::raw;
  using hraw = typename Hs::raw;
  using acc = typename S::acc;
  const int64_t cols = a.cols;
  const Vector<acc> weight = row_vector<acc, D>(a.weight, a.weight_fp32, cols, acc(1));
  const Vector<acc> bias = row_vector<acc, D>(a.bias, a.weight_fp32, cols, acc(-0.0));
  const Vector<acc> input_bias = row_vector<acc, D>(a.input_bias, false, cols, acc(-0.0));
  const AffineConsts<acc> consts = AffineConsts<acc>::make(a.affine);
  const acc eps = static_cast<acc>(a.eps);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    Vector<acc> hv(cols);
    Vector<uint8_t> keep(cols);
    RowSums<acc, 1> sums;
    KeepRange range(stream, a.affine);
    for (int64_t r = r0; r < r1; ++r) {
      const raw* x = static_cast<const raw*>(a.input) + r * cols;
      const hraw* res = a.residual ? static_cast<const hraw*>(a.residual) + r * cols : nullptr;
      hraw* h = a.h ? static_cast<hraw*>(a.h) + r * cols : nullptr;
      row_keep(range, r, cols, a.rows_per_sample, keep.data());
      for (int64_t c = 0; c < cols; ++c) {
        acc v = masked_value<false>(keep[c] != 0, add_rn(S::load(x[c]), input_bias[c]), consts);
        if (res) v = add_rn(v, Hs::load(res[c]));
        const hraw stored = Hs::store(v);
        if (h) h[c] = stored;
        hv[c] = Hs::load(stored);  // the statistics and y come from h as stored
      }
      acc s[1];
      RowStats<acc> stats{acc(0), acc(0)};
      if (!kRms) {
        sums.run(cols, [&](int64_t i, acc(&v)[1]) { v[0] = hv[i]; }, s);
        stats.mean = row_mean(s[0], cols);
      }
      sums.run(
          cols,
          [&](int64_t i, acc(&v)[1]) {
            const acc d = deviation<kRms>(hv[i], stats.mean);
            v[0] = mul_rn(d, d);
          },
          s);
      stats.rstd = row_rstd(s[0], cols, eps);
      if (!kRms) static_cast<acc*>(a.mean)[r] = stats.mean;
      static_cast<acc*>(a.rstd)[r] = stats.rstd;
      raw* y = static_cast<raw*>(a.y) + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        y[c] = S::store(affine_out<true, true>(normalized<kRms>(hv[c], stats), weight[c], bias[c]));
      }
    }
  });
}

template <DType D, bool kWide, bool kRms>
void backward_typed(Variant<D, kWide, kRms>, const NormBackwardArgs& a, const LaneStream& stream) {
  using S = Stored<D>;
  using Hs = Stored<kWide ? DType::kFloat : D>;
  using raw = typename S::raw;
  using hraw = typename Hs::raw;
  using acc = typename S::acc;
  const int64_t cols = a.cols, blocks = row_blocks(a.rows);
  const Vector<acc> weight = row_vector<acc, D>(a.weight, a.weight_fp32, cols, acc(1));
  const Vector<acc> bias =
      row_vector<acc, D>(a.saved_is_y ? a.bias : nullptr, a.weight_fp32, cols, acc(0));
  const AffineConsts<acc> consts = AffineConsts<acc>::make(a.affine);
  // The column sums' partials, one [blocks][cols] slab per sum asked for.
  acc* next = static_cast<acc*>(a.partials);
  const auto slab = [&](const void* wanted) {
    acc* p = wanted ? next : nullptr;
    if (wanted) next += blocks * cols;
    return p;
  };
  acc* const p_weight = slab(a.grad_weight);
  acc* const p_bias = slab(a.grad_bias);
  acc* const p_input_bias = slab(a.grad_input_bias);
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols * kRowBlock, 1));
  // Two sweeps per row over L1-resident data, each a branch-free loop that vectorizes (the
  // presence flags are template arguments). Sweep 1 reads h (or y) and dy once from memory and
  // adds, in one loop, the row sums S(g * xhat) and S(g) into the contract's stripe
  // accumulators and dy * xhat and dy into the block's column partials. Sweep 2 recomputes
  // xhat and g from the same rows (now in L1: cheaper than storing and reloading them) and
  // writes the gradients. Every value is computed by the same expressions, in the same order,
  // as the contract's reference, so the bits are those of core/norm.h's sums.
  parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    Vector<uint8_t> keep(cols);
    const int groups = norm_groups(cols);
    alignas(64) acc sum_gx[kMaxGroups * kStripe], sum_g[kMaxGroups * kStripe];
    KeepRange range(stream, a.affine);
    for (int64_t b = b0; b < b1; ++b) {
      acc* pw = p_weight ? p_weight + b * cols : nullptr;
      acc* pb = p_bias ? p_bias + b * cols : nullptr;
      acc* pib = p_input_bias ? p_input_bias + b * cols : nullptr;
      for (acc* p : {pw, pb, pib}) {
        if (p) std::fill(p, p + cols, acc(0));
      }
      for (int64_t r = b * kRowBlock; r < std::min(a.rows, (b + 1) * kRowBlock); ++r) {
        const RowStats<acc> stats{
            kRms || a.saved_is_y ? acc(0) : static_cast<const acc*>(a.mean)[r],
            static_cast<const acc*>(a.rstd)[r]};
        const raw* __restrict dy = static_cast<const raw*>(a.dy) + r * cols;
        const void* saved_row =
            a.saved_is_y ? static_cast<const void*>(static_cast<const raw*>(a.saved) + r * cols)
                         : static_cast<const void*>(static_cast<const hraw*>(a.saved) + r * cols);
        const acc* __restrict w = weight.data();
        const acc* __restrict bi = bias.data();
        // xhat of column c, from h or from y; everything by value, so that no store in the
        // loops below may alias what it reads (else GCC leaves them scalar).
        const auto xhat_at = [w, bi, saved_row, stats](auto from_y, int64_t c) -> acc {
          if constexpr (decltype(from_y)::value) {
            return xhat_from_y(S::load(static_cast<const raw*>(saved_row)[c]), w[c], bi[c]);
          } else {
            return normalized<kRms>(Hs::load(static_cast<const hraw*>(saved_row)[c]),
                                    RowStats<acc>{stats.mean, stats.rstd});
          }
        };
        acc c1 = 0, c2 = 0;
        const auto sweep1 = [&](auto from_y, auto has_pw, auto has_pb) {
          std::fill(sum_gx, sum_gx + groups * kStripe, acc(0));
          std::fill(sum_g, sum_g + groups * kStripe, acc(0));
          acc* __restrict cw = pw;
          acc* __restrict cb = pb;
          for (int64_t s0 = 0, s = 0; s0 < cols; s0 += kStripe, ++s) {
            acc* __restrict agx = sum_gx + (s % groups) * kStripe - s0;
            acc* __restrict ag = sum_g + (s % groups) * kStripe - s0;
            const int64_t end = std::min<int64_t>(cols, s0 + kStripe);
            for (int64_t c = s0; c < end; ++c) {
              const acc xh = xhat_at(from_y, c);
              const acc d = S::load(dy[c]);
              const acc gg = mul_rn(d, w[c]);
              agx[c] = add_rn(agx[c], mul_rn(gg, xh));
              ag[c] = add_rn(ag[c], gg);
              if constexpr (decltype(has_pw)::value) cw[c] = add_rn(cw[c], mul_rn(d, xh));
              if constexpr (decltype(has_pb)::value) cb[c] = add_rn(cb[c], d);
            }
          }
          c1 = row_mean(RowSums<acc, 1>::tree(sum_gx, groups), cols);
          c2 = kRms ? acc(0) : row_mean(RowSums<acc, 1>::tree(sum_g, groups), cols);
        };
        using T = std::true_type;
        using F = std::false_type;
        const auto with_pb = [&](auto... flags) {
          pb ? sweep1(flags..., T{}) : sweep1(flags..., F{});
        };
        const auto with_pw = [&](auto... flags) {
          pw ? with_pb(flags..., T{}) : with_pb(flags..., F{});
        };
        a.saved_is_y ? with_pw(T{}) : with_pw(F{});
        row_keep(range, r, cols, a.rows_per_sample, keep.data());
        const hraw* dh_in = a.dh_in ? static_cast<const hraw*>(a.dh_in) + r * cols : nullptr;
        hraw* grad_h = a.grad_h ? static_cast<hraw*>(a.grad_h) + r * cols : nullptr;
        raw* grad_input = static_cast<raw*>(a.grad_input) + r * cols;
        const acc rstd = stats.rstd;
        const auto sweep2 = [&, c1, c2](auto from_y, auto has_dh_in, auto has_grad_h,
                                        auto has_pib) {
          const uint8_t* __restrict k = keep.data();
          const AffineConsts<acc> mc = consts;
          const hraw* __restrict din = dh_in;
          hraw* __restrict gh = grad_h;
          raw* __restrict gi = grad_input;
          acc* __restrict ib = pib;
          for (int64_t c = 0; c < cols; ++c) {
            const acc xh = xhat_at(from_y, c);
            const acc gg = mul_rn(S::load(dy[c]), w[c]);
            acc dh = h_gradient<kRms>(gg, xh, rstd, c1, c2);
            if constexpr (decltype(has_dh_in)::value) dh = add_rn(dh, Hs::load(din[c]));
            if constexpr (decltype(has_grad_h)::value) gh[c] = Hs::store(dh);
            const raw out = S::store(masked_value<false>(k[c] != 0, dh, mc));
            gi[c] = out;
            if constexpr (decltype(has_pib)::value) ib[c] = add_rn(ib[c], S::load(out));
          }
        };
        const auto with_pib = [&](auto... flags) {
          pib ? sweep2(flags..., T{}) : sweep2(flags..., F{});
        };
        const auto with_grad_h = [&](auto... flags) {
          grad_h ? with_pib(flags..., T{}) : with_pib(flags..., F{});
        };
        const auto with_dh_in = [&](auto... flags) {
          dh_in ? with_grad_h(flags..., T{}) : with_grad_h(flags..., F{});
        };
        a.saved_is_y ? with_dh_in(T{}) : with_dh_in(F{});
      }
    }
  });
  // The totals: the partials added in block order.
  const auto total = [&](const acc* p, void* out) {
    if (out == nullptr) return;
    parallel_for(0, cols, kGrainElements / std::max<int64_t>(blocks, 1),
                 [&](int64_t c0, int64_t c1) {
                   acc* t = static_cast<acc*>(out);
                   std::fill(t + c0, t + c1, acc(0));
                   for (int64_t b = 0; b < blocks; ++b) {  // each column in block order
                     for (int64_t c = c0; c < c1; ++c) t[c] = add_rn(t[c], p[b * cols + c]);
                   }
                 });
  };
  total(p_weight, a.grad_weight);
  total(p_bias, a.grad_bias);
  total(p_input_bias, a.grad_input_bias);
}

}  // namespace

void norm_forward_cpu(const NormForwardArgs& args, uint64_t seed, uint64_t offset) {
  const LaneStream stream(PhiloxStream::make(seed, offset));
  dispatch(args.dtype, args.wide_h, args.rms,
           [&](auto variant) { forward_typed(variant, args, stream); });
}

void norm_backward_cpu(const NormBackwardArgs& args, uint64_t seed, uint64_t offset) {
  const LaneStream stream(PhiloxStream::make(seed, offset));
  dispatch(args.dtype, args.wide_h, args.rms,
           [&](auto variant) { backward_typed(variant, args, stream); });
}

}  // namespace FD_CPU_NS
}  // namespace fused_dropout
