// What the CPU kernels of multi_lora_linear share: the problem description, per-thread
// scratch, element conversions, the instruction-set choice and the parallel driver. The
// entry points (multi_lora_cpu.cpp) run the two passes declared at the end: shrink-expand
// (shrink_expand.cpp) and the weight gradients (weight_grad.cpp).
#pragma once

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fedhello::cpu {

constexpr double kMinParallelWork = 1 << 16;  // multiply-adds below which one thread is faster

// ---------------------------------------------------------------------------------------
// Problem description shared by all kernels.

struct Routing {
  int64_t rows;
  int64_t d_in;
  int64_t d_out;
  int64_t num_clients;
  int64_t r_max;
  const int32_t* sorted_rows;  // [T] row indices, grouped by client
  const int32_t* offsets;      // [N + 1] start of each client's run in sorted_rows
  const float* scaling;        // [N]
  const int32_t* ranks;        // [N]
  const bool* trainable;       // [N] (backward only)

  int64_t count(int64_t c) const { return offsets[c + 1] - offsets[c]; }
  // Client c has rows and a LoRA term; c == num_clients (the unrouted rows) never has.
  bool active(int64_t c) const { return c < num_clients && count(c) > 0 && ranks[c] > 0; }
};

// Shrink then expand over one row tile. Forward: z = x, m1 = A, p = H, m2 = B^T, target =
// out, bias32 = the bias. Backward: z = dy, m1 = B^T, p = G (scaled), m2 = A, target = dx
// (optional), no bias.
template <typename T>
struct ShrinkExpand {
  const Routing* route;
  const T* z;
  int64_t k_len;
  const float* m1;  // [N][r_max][k_len]
  bool scale_p;     // multiply P by s_c (backward G)
  float* p;         // [T][r_max] by position
  const float* m2;  // [N][r_max][n_len]
  int64_t n_len;
  bool scale_out;   // multiply the expansion by s_c (forward)
  const float* bias32;  // [n_len] in fp32, added to every row of target; nullptr: zeros
  T* target;        // [T][n_len], written (never read) for every row; nullptr: shrink only
};

// Per-thread buffers, sized once before a parallel region (nothing inside may throw).
struct Scratch {
  std::vector<float> z;    // converted input rows
  std::vector<float> acc;  // fp32 accumulation rows / gradient block
  std::vector<const float*> zrows;
  std::vector<const float*> prows;
  std::vector<float*> drows;

  Scratch(int64_t z_elems, int64_t acc_elems, int64_t max_rows)
      : z(z_elems), acc(acc_elems), zrows(max_rows), prows(max_rows), drows(max_rows) {}
};

// ---------------------------------------------------------------------------------------
// Element conversions.

template <typename T>
inline void to_float(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// fp32 views of columns [col0, col0 + len) of rows `rows[0..n)` of z [*, ld]: pointers into
// z itself for float32, into converted copies in `buf` otherwise.
template <typename T>
inline void gather_rows(const T* z, int64_t ld, const int32_t* rows, int64_t n, int64_t col0, int64_t len,
                        float* buf, const float** out) {
  for (int64_t i = 0; i < n; ++i) {
    const T* src = z + static_cast<int64_t>(rows[i]) * ld + col0;
    if constexpr (std::is_same_v<T, float>) {
      out[i] = src;
    } else {
      float* b = buf + i * len;
      to_float(src, len, b);
      out[i] = b;
    }
  }
}

// ---------------------------------------------------------------------------------------
// One copy of each pass's item function per instruction set; `flatten` inlines the whole
// micro-kernel tree into each copy so that all of it is compiled for that target. A pass
// defines FEDHELLO_ISA_VARIANT(NAME, ATTRS, WIDTH) to write its NAME_<isa> wrapper for
// vectors of WIDTH floats, expands FEDHELLO_FOR_EACH_ISA(FEDHELLO_ISA_VARIANT), and picks
// the copy to run with FEDHELLO_ACTIVE_VARIANT.

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FEDHELLO_X86_DISPATCH 1
#define FEDHELLO_FOR_EACH_ISA(V)                                        \
  V(baseline, __attribute__((flatten)), 4)                              \
  V(avx2, __attribute__((target("avx2,fma,f16c"), flatten)), 8)         \
  V(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten)), 16)
#else
#define FEDHELLO_FOR_EACH_ISA(V) V(baseline, __attribute__((flatten)), 4)
#endif

enum class SimdLevel { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* simd_name(SimdLevel s) {
  switch (s) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    default: return "baseline";
  }
}

inline SimdLevel best_supported_simd() {
#ifdef FEDHELLO_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return SimdLevel::kAvx512;
  }
  if (avx2) return SimdLevel::kAvx2;
#endif
  return SimdLevel::kBaseline;
}

// The level every pass runs with (one variable for the whole extension: an inline function's
// static is shared by all translation units).
inline SimdLevel& active_simd() {
  static SimdLevel level = best_supported_simd();
  return level;
}

// &NAME_<isa><T>, the copy of a pass's item function for the active instruction set.
#ifdef FEDHELLO_X86_DISPATCH
#define FEDHELLO_ACTIVE_VARIANT(NAME, T)                                                 \
  (::fedhello::cpu::active_simd() == ::fedhello::cpu::SimdLevel::kAvx512 ? &NAME##_avx512<T> \
   : ::fedhello::cpu::active_simd() == ::fedhello::cpu::SimdLevel::kAvx2 ? &NAME##_avx2<T>   \
                                                                         : &NAME##_baseline<T>)
#else
#define FEDHELLO_ACTIVE_VARIANT(NAME, T) (&NAME##_baseline<T>)
#endif

// ---------------------------------------------------------------------------------------
// Parallel driver.

inline int plan_threads(int64_t n_items, double work) {
  if (n_items < 2 || work < kMinParallelWork || at::in_parallel_region()) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_items));
}

// Runs body(item, scratch) for every item; dynamic scheduling balances uneven clients.
template <typename Body>
void for_each_item(int64_t n_items, int threads, std::vector<Scratch>& scratch, const Body& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) body(i, scratch[omp_get_thread_num()]);
    return;
  }
#endif
  for (int64_t i = 0; i < n_items; ++i) body(i, scratch[0]);
}

inline std::vector<Scratch> make_scratch(int threads, int64_t z_elems, int64_t acc_elems, int64_t max_rows) {
  std::vector<Scratch> s;
  s.reserve(threads);
  for (int i = 0; i < threads; ++i) s.emplace_back(z_elems, acc_elems, max_rows);
  return s;
}

// ---------------------------------------------------------------------------------------
// The two passes, for T = float, c10::Half and c10::BFloat16.

// Runs `op` over every active client's rows and, when op.target is set, writes every row of
// op.target (shrink_expand.cpp).
template <typename T>
void run_shrink_expand(const ShrinkExpand<T>& op);

// d_a [N, r_max, d_in] and d_b [N, d_out, r_max] (zero-filled by the caller) receive the
// complete weight gradients of the active trainable clients from x, dy [T, *] and g, h (fp32
// [T, r_max] by position, g already scaled by s_c); when grad_sqnorm is not null,
// grad_sqnorm[c] += ||dA_c||^2 + ||dB_c||^2 for those clients (weight_grad.cpp).
template <typename T>
void run_weight_grads(const Routing& rt, const T* x, const T* dy, const float* g, const float* h, T* d_a, T* d_b,
                      float* grad_sqnorm);

}  // namespace fedhello::cpu
