// Which CPU capability the kernels run (cpu/capability.h): the best one this CPU has, or the
// one FUSED_DROPOUT_CPU_CAPABILITY names; and at::parallel_for for the kernel files.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/capability.h"

namespace fused_dropout {

void cpu_parallel_for(int64_t begin, int64_t end, int64_t grain,
                      void (*body)(void* ctx, int64_t b, int64_t e), void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

namespace {

struct Capability {
  const char* name;
  const char* extensions;  // space-separated
};

#define FD_CPU_ROW(cap, extensions, ...) {#cap, extensions},
constexpr Capability kCapabilities[] = {FD_CPU_CAPABILITIES(FD_CPU_ROW, _)};
#undef FD_CPU_ROW
constexpr int kCount = sizeof(kCapabilities) / sizeof(kCapabilities[0]);

std::vector<std::string> words(const char* text, char sep) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string w; std::getline(in, w, sep);) {
    if (!w.empty()) out.push_back(w);
  }
  return out;
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// Whether the CPU (and the OS, which must save the wide registers) has the ISA extension.
// FUSED_DROPOUT_CPU_HIDE (comma-separated extensions) makes some look absent, as on an older
// CPU: to test the paths and errors of one.
bool cpu_has(const std::string& ext) {
  if (const char* hidden = std::getenv("FUSED_DROPOUT_CPU_HIDE")) {
    for (const auto& h : words(hidden, ',')) {
      if (h == ext) return false;
    }
  }
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#define FD_CPU_EXTENSION(e) \
  if (ext == #e) return __builtin_cpu_supports(#e);
  FD_CPU_EXTENSION(avx2)
  FD_CPU_EXTENSION(fma)
  FD_CPU_EXTENSION(bmi)
  FD_CPU_EXTENSION(bmi2)
  FD_CPU_EXTENSION(f16c)
  FD_CPU_EXTENSION(avx512f)
  FD_CPU_EXTENSION(avx512bw)
  FD_CPU_EXTENSION(avx512vl)
  FD_CPU_EXTENSION(avx512dq)
  FD_CPU_EXTENSION(avx512bf16)
#undef FD_CPU_EXTENSION
#endif
  TORCH_CHECK(false, "fused_dropout: no CPU feature test for the ISA extension ", ext);
}

std::vector<std::string> missing_extensions(int cap) {
  std::vector<std::string> missing;
  for (const auto& ext : words(kCapabilities[cap].extensions, ' ')) {
    if (!cpu_has(ext)) missing.push_back(ext);
  }
  return missing;
}

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (int i = 0; i < kCount; ++i) names.push_back(kCapabilities[i].name);
  return names;
}

std::vector<std::string> runnable() {
  std::vector<std::string> names;
  for (int i = 0; i < kCount; ++i) {
    if (missing_extensions(i).empty()) names.push_back(kCapabilities[i].name);
  }
  return names;
}

// The capability `name`, which must be one this CPU can run; `what` says who asked for it.
int runnable_capability(const std::string& name, const std::string& what, const char* fix) {
  int cap = 0;
  while (cap < kCount && kCapabilities[cap].name != name) ++cap;
  TORCH_CHECK(cap < kCount, what, ": no such CPU capability; fused_dropout has ",
              joined(cpu_capabilities()));
  const std::vector<std::string> missing = missing_extensions(cap);
  TORCH_CHECK(missing.empty(), what, ": this CPU lacks ", joined(missing),
              ", which that path needs; it can run ", joined(runnable()), ". Fix: ", fix);
  return cap;
}

int chosen_at_load() {
  const char* forced = std::getenv("FUSED_DROPOUT_CPU_CAPABILITY");
  if (forced != nullptr && *forced != '\0') {
    return runnable_capability(forced, std::string("FUSED_DROPOUT_CPU_CAPABILITY=") + forced,
                               "set it to one of those, or unset it to run the best one.");
  }
  int best = 0;
  for (int i = 0; i < kCount; ++i) {
    if (missing_extensions(i).empty()) best = i;
  }
  return best;
}

std::atomic<int> g_in_use{-1};

std::string cpu_capability() { return kCapabilities[cpu_capability_index()].name; }

std::vector<std::string> cpu_capability_missing(const std::string& name) {
  for (int i = 0; i < kCount; ++i) {
    if (kCapabilities[i].name == name) return missing_extensions(i);
  }
  TORCH_CHECK(false, "fused_dropout: ", name, " is not a CPU capability (",
              joined(cpu_capabilities()), ")");
}

std::string set_cpu_capability(const std::string& name) {
  const std::string previous = cpu_capability();
  g_in_use.store(runnable_capability(name, "fused_dropout.ops.set_cpu_capability('" + name + "')",
                                     "choose one of those."),
                 std::memory_order_relaxed);
  return previous;
}

}  // namespace

int cpu_capability_index() {
  int cap = g_in_use.load(std::memory_order_relaxed);
  if (cap < 0) {  // the first call (the loader makes it at load); racing ones agree
    cap = chosen_at_load();
    g_in_use.store(cap, std::memory_order_relaxed);
  }
  return cap;
}

TORCH_LIBRARY_IMPL(fused_dropout, CompositeExplicitAutograd, m) {
  m.impl("cpu_capability", cpu_capability);
  m.impl("cpu_capabilities", cpu_capabilities);
  m.impl("cpu_capability_missing", cpu_capability_missing);
  m.impl("set_cpu_capability", set_cpu_capability);
}

}  // namespace fused_dropout
