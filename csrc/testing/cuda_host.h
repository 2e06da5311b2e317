// A small model of CUDA's execution on the host, so that the unchanged csrc/cuda/*.cu kernels
// compile with the host C++ compiler and run on the CPU (tests/cuda_host.py builds them).
//
// - Every block of a launch runs in turn; its threads run as fibers (ucontext) on one OS thread,
//   so __syncthreads, __syncwarp and the warp shuffles are barriers between fibers, and a
//   __shared__ variable (a function-local static) is shared by the threads of the running block.
// - Geometry knobs (host_config()): the SM count the device reports, a grid size that replaces
//   the launcher's own (valid for grid-stride kernels: any grid gives the same result), and a
//   window of blocks to run alone (for tensors too large to process whole).
// - A launch checks CUDA's limits on its configuration and leaves the error for
//   cudaGetLastError(), as a real launch does.
// - The fp16 and bf16 conversions are NVIDIA's own host code (cuda_fp16.h, cuda_bf16.h), bit-exact
//   with the GPU's for every value (a NaN's pattern aside: the kernels fix bf16's);
//   at::cuda::philox::unpack is torch's (ATen/cuda/PhiloxUtils.cuh), plain and graph-captured.
// - __CUDA_ARCH__ is defined, so csrc/core takes its device branches.
//
// A .cu file is compiled as C++ with this header force-included, after its `k<<<cfg>>>(args)`
// launches are rewritten to `::cuda_host::launch(k, ::cuda_host::LaunchConfig(cfg))(args)`.
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "cuda_host.h is the host model of CUDA: compile with the host C++ compiler, not nvcc"
#endif

// NVIDIA's headers first, in their host form (before __CUDA_ARCH__ exists).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace cuda_host {

// What the tests set before a launch (see tests/cuda_host.py).
struct HostConfig {
  int sm_count = 132;  // cudaDevAttrMultiProcessorCount (132: an H100 SXM)
  int grid_x = 0;      // > 0: every launch runs with this gridDim.x instead of its own
  // block_count > 0: run only the blocks first_block .. first_block + block_count - 1 (linear
  // index) of each launch; the others are skipped, as if another GPU ran them.
  int64_t first_block = 0, block_count = 0;
  int max_threads = 1024;
};

// What the last launches did, for the tests to check.
struct LaunchLog {
  int launches = 0;
  dim3 grid, block;
  int resident_blocks = 0;  // the occupancy the model gives the last kernel launched
  std::string error;        // a broken CUDA rule (divergent barrier, bad shuffle mask), or ""
};

inline HostConfig& host_config() {
  static HostConfig c;
  return c;
}
inline LaunchLog& launch_log() {
  static LaunchLog l;
  return l;
}

// cudaOccupancyMaxActiveBlocksPerMultiprocessor's answer for a kernel. On a GPU it follows
// each kernel's registers and __launch_bounds__, so variants of one op differ; the model gives
// the kernels it meets 2, 3, ..., 8, 2, ... blocks in turn (kept for the process, as a GPU's
// answer is), so a launcher that sizes one kernel's grid by another's answer is caught.
inline int resident_blocks_of(const void* kernel) {
  static std::vector<const void*> seen;
  const auto found = std::find(seen.begin(), seen.end(), kernel);
  const size_t index = found - seen.begin();
  if (found == seen.end()) seen.push_back(kernel);
  return 2 + static_cast<int>(index % 7);
}

namespace detail {
// The running fiber's coordinates: plain globals, set before each switch into a fiber.
inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline cudaError_t last_error = cudaSuccess;
}  // namespace detail

}  // namespace cuda_host

// The built-in variables, read-only for the kernel.
inline const uint3& threadIdx = cuda_host::detail::thread_idx;
inline const uint3& blockIdx = cuda_host::detail::block_idx;
inline const dim3& blockDim = cuda_host::detail::block_dim;
inline const dim3& gridDim = cuda_host::detail::grid_dim;
constexpr int warpSize = 32;

// The execution-space keywords (crt/host_defines.h leaves these as nothing or undefined on the
// host). A block's threads share a function-local static: blocks run one at a time.
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define __CUDA_ARCH__ 900

namespace cuda_host {
namespace detail {

enum class Wait { kRun, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  Wait wait = Wait::kRun;
  uint32_t warp_mask = 0;  // the lanes a warp barrier waits for
  uint64_t exchange = 0;   // a shuffle's value, read by the other lanes
};

// The block being run: its fibers, and the scheduler's own context.
struct Block {
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  ucontext_t scheduler;
  int current = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline Block& block() {
  static Block b;
  return b;
}

inline uint3 linear_to_idx(int t, dim3 d) {
  return {static_cast<unsigned>(t % d.x), static_cast<unsigned>((t / d.x) % d.y),
          static_cast<unsigned>(t / (d.x * d.y))};
}

inline void set_current(int t) {
  block().current = t;
  thread_idx = linear_to_idx(t, block_dim);
}

// Leaves the running fiber for the scheduler until `wait` is released.
inline void yield(Wait wait) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  f.wait = wait;
  swapcontext(&f.context, &b.scheduler);
}

inline void fiber_main() {
  Block& b = block();
  b.body(b.body_arg);
  b.fibers[b.current].wait = Wait::kDone;
  // returning resumes uc_link: the scheduler
}

inline void fail(const std::string& what) {
  if (launch_log().error.empty()) launch_log().error = what;
}

// Releases the barriers that every fiber they wait for has reached; false if none could be.
inline bool release_barriers() {
  Block& b = block();
  const int n = static_cast<int>(b.fibers.size());
  bool released = false;
  int at_block = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    at_block += f.wait == Wait::kBlockBarrier;
    done += f.wait == Wait::kDone;
  }
  if (at_block > 0 && at_block + done == n) {
    if (done > 0) fail("__syncthreads() not reached by every thread of the block");
    for (Fiber& f : b.fibers) {
      if (f.wait == Wait::kBlockBarrier) f.wait = Wait::kRun;
    }
    released = true;
  }
  for (int w = 0; w < n; w += warpSize) {
    uint32_t arrived = 0, mask = 0;
    for (int lane = 0; lane < warpSize && w + lane < n; ++lane) {
      const Fiber& f = b.fibers[w + lane];
      if (f.wait == Wait::kWarpBarrier) arrived |= 1u << lane, mask |= f.warp_mask;
    }
    if (arrived != 0 && (arrived & mask) == mask) {
      for (int lane = 0; lane < warpSize && w + lane < n; ++lane) {
        if (arrived >> lane & 1) b.fibers[w + lane].wait = Wait::kRun;
      }
      released = true;
    }
  }
  return released;
}

// Runs the threads of one block until all are done.
inline void run_block(int threads) {
  Block& b = block();
  constexpr size_t kStack = 64 * 1024;
  b.fibers.assign(threads, Fiber{});
  if (b.stacks.size() < threads * kStack) b.stacks.resize(threads * kStack);
  for (int t = 0; t < threads; ++t) {
    ucontext_t& c = b.fibers[t].context;
    getcontext(&c);
    c.uc_stack.ss_sp = b.stacks.data() + t * kStack;
    c.uc_stack.ss_size = kStack;
    c.uc_link = &b.scheduler;
    makecontext(&c, fiber_main, 0);
  }
  for (;;) {
    bool ran = false;
    for (int t = 0; t < threads; ++t) {
      if (b.fibers[t].wait != Wait::kRun) continue;
      set_current(t);
      swapcontext(&b.scheduler, &b.fibers[t].context);
      ran = true;
    }
    if (ran) continue;
    if (!release_barriers()) break;
  }
  for (const Fiber& f : b.fibers) {
    if (f.wait != Wait::kDone) {
      fail("deadlock: a barrier (__syncthreads, __syncwarp or a shuffle) is never reached");
      break;
    }
  }
}

inline bool valid(dim3 grid, dim3 block, size_t shared_bytes) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7FFFFFFFu && grid.y <= 65535 &&
         grid.z <= 65535 && threads >= 1 && threads <= uint64_t(host_config().max_threads) &&
         block.z <= 64 && shared_bytes <= 48 * 1024;
}

}  // namespace detail

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t shared = 0, cudaStream_t s = nullptr)
      : grid(g), block(b), shared_bytes(shared), stream(s) {}
};

// kernel<<<config>>>(args...): every block in turn, each thread of a block as a fiber.
template <typename... Params>
auto launch(void (*kernel)(Params...), LaunchConfig config) {
  return [kernel, config](auto&&... args) {
    using namespace detail;
    LaunchLog& log = launch_log();
    dim3 grid = config.grid;
    if (host_config().grid_x > 0) grid.x = host_config().grid_x;
    if (!valid(grid, config.block, config.shared_bytes)) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    ++log.launches;
    log.grid = grid;
    log.block = config.block;
    log.resident_blocks = resident_blocks_of(reinterpret_cast<const void*>(kernel));
    // Each thread calls the kernel with its own copy of the arguments (the same values).
    auto call = [&]() { kernel(args...); };
    Block& b = block();
    b.body = [](void* f) { (*static_cast<decltype(call)*>(f))(); };
    b.body_arg = &call;
    grid_dim = grid;
    block_dim = config.block;
    const int threads = config.block.x * config.block.y * config.block.z;
    const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
    const HostConfig& host = host_config();
    const int64_t first = host.block_count > 0 ? std::min(host.first_block, blocks) : 0;
    const int64_t last = host.block_count > 0 ? std::min(first + host.block_count, blocks) : blocks;
    for (int64_t i = first; i < last; ++i) {
      block_idx = {static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                   static_cast<unsigned>(i / (int64_t(grid.x) * grid.y))};
      run_block(threads);
    }
  };
}

}  // namespace cuda_host

// ---------------------------------------------------------------- runtime API used by launchers

namespace cuda_host {
inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = host_config().sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = host_config().max_threads;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = warpSize;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}
template <typename Kernel>
inline cudaError_t occupancy_max_active_blocks(int* blocks, Kernel kernel, int, size_t) {
  *blocks = resident_blocks_of(reinterpret_cast<const void*>(kernel));
  return cudaSuccess;
}
inline cudaError_t get_last_error() {
  const cudaError_t e = detail::last_error;
  detail::last_error = cudaSuccess;
  return e;
}
}  // namespace cuda_host
// Macros, not definitions of the real names: the process also holds torch's libcudart.
#define cudaGetDevice ::cuda_host::get_device
#define cudaDeviceGetAttribute ::cuda_host::device_get_attribute
#define cudaGetLastError ::cuda_host::get_last_error
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::cuda_host::occupancy_max_active_blocks
#define cudaPeekAtLastError() (::cuda_host::detail::last_error)

// ---------------------------------------------------------------- device intrinsics

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline void __stwb(T* p, T value) {
  *p = value;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
// Separately rounded float ops: the host build uses -ffp-contract=off and SSE rounding.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
// IEEE division and square root, correctly rounded (SSE's divss/sqrtss are): core/norm.h's.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fsqrt_rn(float a) { return __builtin_sqrtf(a); }
inline double __dsqrt_rn(double a) { return __builtin_sqrt(a); }
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
inline int __float_as_int(float f) { return __builtin_bit_cast(int, f); }
inline float __int_as_float(int i) { return __builtin_bit_cast(float, i); }
inline long long __double_as_longlong(double d) { return __builtin_bit_cast(long long, d); }
inline double __longlong_as_double(long long i) { return __builtin_bit_cast(double, i); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// Only one fiber runs at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// ---------------------------------------------------------------- block and warp cooperation

inline void __syncthreads() { cuda_host::detail::yield(cuda_host::detail::Wait::kBlockBarrier); }

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  using namespace cuda_host::detail;
  Block& b = block();
  if ((mask >> (b.current % warpSize) & 1) == 0) fail("__syncwarp by a lane not in its mask");
  b.fibers[b.current].warp_mask = mask;
  yield(Wait::kWarpBarrier);
}

namespace cuda_host::detail {
inline int lane_id() { return block().current % warpSize; }

// Every lane of `mask` publishes its value, then reads that of lane `src` of its group of
// `width` lanes; a source outside the mask leaves the caller's own value (undefined on the GPU).
template <typename T>
T shuffle(unsigned mask, T value, int src, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  Block& b = block();
  const int self = b.current;
  const int source = self - lane_id() % width + src;  // a thread of this warp
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  b.fibers[self].exchange = bits;
  __syncwarp(mask);
  T result = value;
  if (mask >> (source % warpSize) & 1) {
    std::memcpy(&result, &b.fibers[source].exchange, sizeof(T));
  } else {
    fail("shuffle from a lane outside the mask");
  }
  __syncwarp(mask);  // no lane overwrites its value before every lane has read it
  return result;
}
}  // namespace cuda_host::detail

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  return cuda_host::detail::shuffle(mask, value, src_lane & (width - 1), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  const int lane = cuda_host::detail::lane_id() % width;
  return cuda_host::detail::shuffle(mask, value, (lane ^ lane_mask) & (width - 1), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  const int lane = cuda_host::detail::lane_id() % width;
  const int src = lane + static_cast<int>(delta);
  return cuda_host::detail::shuffle(mask, value, src < width ? src : lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  const int lane = cuda_host::detail::lane_id() % width;
  const int src = lane - static_cast<int>(delta);
  return cuda_host::detail::shuffle(mask, value, src >= 0 ? src : lane, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  unsigned result = 0;
  for (int src = 0; src < warpSize; ++src) {
    if (mask >> src & 1) result |= __shfl_sync(mask, predicate != 0 ? 1u : 0u, src) << src;
  }
  return result;
}

// ---------------------------------------------------------------- faults

namespace cuda_host {
namespace detail {
inline sigjmp_buf fault_jump;
inline void* fault_address = nullptr;
inline int fault_signal = 0;
inline void on_fault(int sig, siginfo_t* info, void*) {
  fault_signal = sig;
  fault_address = info->si_addr;
  siglongjmp(fault_jump, 1);
}
}  // namespace detail

// Runs `f` (launches) and turns a memory fault, or the trap of a misaligned or out-of-bounds
// access (-fsanitize=alignment,bounds with traps), into an error message naming the thread.
template <typename F>
std::string catch_faults(F&& f) {
  using namespace detail;
  struct sigaction action = {}, old_segv = {}, old_bus = {}, old_ill = {};
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &old_segv);
  sigaction(SIGBUS, &action, &old_bus);
  sigaction(SIGILL, &action, &old_ill);
  std::string error;
  if (sigsetjmp(fault_jump, 1) == 0) {
    f();
  } else {
    char text[256];
    std::snprintf(text, sizeof(text), "%s at address %p in block (%u, %u, %u), thread (%u, %u, %u)",
                  fault_signal == SIGILL ? "trap (misaligned or out-of-bounds access)"
                                         : "memory fault (out-of-bounds access)",
                  fault_address, block_idx.x, block_idx.y, block_idx.z, thread_idx.x, thread_idx.y,
                  thread_idx.z);
    error = text;
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaction(SIGILL, &old_ill, nullptr);
  return error;
}

// One call of a C entry point (testing/*_host.cpp): `op`'s geometry set, the launch log reset,
// `launcher` (returning a cudaError_t) run with faults caught, the launches it made written
// back to `op`, and any error into `error`. Returns 0, or 1 with an error.
template <typename Op, typename F>
int run_entry(Op* op, const char* name, F&& launcher, char* error, int error_size) {
  host_config().sm_count = op->sm_count;
  host_config().grid_x = op->grid_x;
  host_config().first_block = op->first_block;
  host_config().block_count = op->block_count;
  LaunchLog& log = launch_log();
  log = {};
  cudaError_t status = cudaSuccess;
  std::string text = catch_faults([&] { status = launcher(); });
  op->launches = log.launches;
  op->grid[0] = log.grid.x, op->grid[1] = log.grid.y, op->grid[2] = log.grid.z;
  op->block[0] = log.block.x, op->block[1] = log.block.y, op->block[2] = log.block.z;
  if (text.empty()) text = log.error;
  if (text.empty() && status != cudaSuccess) {
    text = std::string(name) + " returned cudaError " + std::to_string(static_cast<int>(status));
  }
  if (text.empty()) return 0;
  std::snprintf(error, error_size, "%s", text.c_str());
  return 1;
}
}  // namespace cuda_host
