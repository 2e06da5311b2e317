// CPU capability dispatch: the CPU kernels are compiled for several instruction sets in one
// library, and the best one the CPU has runs (as ATen's DispatchStub does).
//
// Every csrc/cpu/*.cpp is a kernel file. The loader compiles it once per row of
// FD_CPU_CAPABILITIES, with -m<ext> for the row's ISA extensions and -DFD_CPU_NS=cpu_<name>,
// without torch's headers, include paths or flags. A kernel file:
//  - declares its entry points in its header with FD_CPU_KERNEL(name, function type); generic
//    code calls name(args...) and runs the implementation of the capability in use
//    (ops/cpu_dispatch.cpp chooses it: the best one the CPU has, or
//    FUSED_DROPOUT_CPU_CAPABILITY);
//  - defines them, and everything else, inside `namespace fused_dropout { namespace FD_CPU_NS {`
//    (its internals in an anonymous namespace in there), so each object's symbols are its own;
//  - includes no ATen, c10 or torch header, and instantiates nothing out of line from a
//    header outside that namespace (Vector below, not std::vector; no std::function, ...).
//    An inline function that an AVX-512 object emits as a weak symbol may be the copy the
//    linker keeps for generic code too, which then dies of SIGILL on an older CPU.
//    tests/test_cpu_dispatch.py checks the built objects with nm;
//  - runs its parallel loops with parallel_for (below; at::parallel_for, called from generic
//    code) and converts fp16/bf16 with the bit-level code of core/masked_op.h;
//  - may specialize its code with the ISA macros (__AVX512F__, __AVX2__, ...).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>
#include <vector>

// The capabilities, lowest first: a name, and the ISA extensions (GCC's -m and
// __builtin_cpu_supports names) its objects are compiled for and a CPU must have to run them.
// X(name, "extensions", ...) with the macro's extra arguments. fused_dropout/_loader/config.py
// reads these rows (one per line, as written). avx512bf16 differs from avx512 only in its
// bf16 rounding (cpu/vec.h): one instruction instead of seven.
#if defined(__x86_64__) || defined(_M_X64)
#define FD_CPU_CAPABILITIES(X, ...)                                                   \
  X(default, "", __VA_ARGS__)                                                         \
  X(avx2, "avx2 fma bmi bmi2 f16c", __VA_ARGS__)                                      \
  X(avx512, "avx2 fma bmi bmi2 f16c avx512f avx512bw avx512vl avx512dq", __VA_ARGS__) \
  X(avx512bf16, "avx2 fma bmi bmi2 f16c avx512f avx512bw avx512vl avx512dq avx512bf16", __VA_ARGS__)
#else
#define FD_CPU_CAPABILITIES(X, ...) X(default, "", __VA_ARGS__)
#endif

namespace fused_dropout {

template <typename T>
using CpuKernelType = T;  // lets a macro declare a function from its type

// at::parallel_for(begin, end, grain, ...) calling body(ctx, b, e) on each chunk [b, e).
void cpu_parallel_for(int64_t begin, int64_t end, int64_t grain,
                      void (*body)(void* ctx, int64_t b, int64_t e), void* ctx);

#ifdef FD_CPU_NS  // a kernel file, compiled for one capability

#define FD_CPU_KERNEL(name, ...)   \
  namespace FD_CPU_NS {            \
  CpuKernelType<__VA_ARGS__> name; \
  }

// For code GCC would otherwise call: the unrolled per-vector code of the sweeps, and Philox
// drawn between other work (a call there spills the caller's vectors around it).
#define FD_ALWAYS_INLINE inline __attribute__((always_inline))
#define FD_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

namespace FD_CPU_NS {

// at::parallel_for's interface: f(b, e) on chunks of [begin, end) of at least `grain`.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  cpu_parallel_for(
      begin, end, grain,
      [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// An allocator of this capability's own: std::vector's members, instantiated for
// Vector<T>, name it, so they belong to this object alone (a std::vector<float>'s could be
// emitted here and picked for generic code).
template <typename T>
struct Allocator {
  using value_type = T;
  Allocator() = default;
  template <typename U>
  Allocator(const Allocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T))); }
  void deallocate(T* p, size_t) noexcept { ::operator delete(p); }
  template <typename U>
  bool operator==(const Allocator<U>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const Allocator<U>&) const noexcept {
    return false;
  }
};

template <typename T>
using Vector = std::vector<T, Allocator<T>>;

}  // namespace FD_CPU_NS

#else  // generic code

// The position in FD_CPU_CAPABILITIES of the capability in use (ops/cpu_dispatch.cpp).
int cpu_capability_index();

#define FD_CPU_DECLARE_IN(cap, extensions, name, ...) \
  namespace cpu_##cap {                               \
    CpuKernelType<__VA_ARGS__> name;                  \
  }
#define FD_CPU_ADDRESS_IN(cap, extensions, name, ...) &cpu_##cap::name,
#define FD_CPU_KERNEL(name, ...)                                      \
  FD_CPU_CAPABILITIES(FD_CPU_DECLARE_IN, name, __VA_ARGS__)           \
  template <typename... Args>                                         \
  decltype(auto) name(Args&&... args) {                               \
    static CpuKernelType<__VA_ARGS__>* const impl[] = {               \
        FD_CPU_CAPABILITIES(FD_CPU_ADDRESS_IN, name, __VA_ARGS__)};   \
    return impl[cpu_capability_index()](std::forward<Args>(args)...); \
  }

#endif

}  // namespace fused_dropout
