// CPU backend of multi_lora_linear: the LoRA part of the forward and backward passes for
// N clients in one call (docs/design.md, section 1), parallel over (client, row-tile) and
// (client, column-block) work items with OpenMP, fp32 accumulation and an fp32 rank
// intermediate whatever the input dtype (float32, float16, bfloat16).
//
// Forward, one item per (client c, tile of c's rows in plan order):
//   H[pos, :r_c] = X[row] A_c[:r_c]^T            (kept in fp32, returned for the backward)
//   out[row]     = bias + s_c H[pos, :r_c] B_c[:, :r_c]^T
// Backward, phase 1 (same items):
//   G[pos, :r_c] = s_c dY[row] B_c[:, :r_c]      (fp32)
//   dx[row]      = G[pos, :r_c] A_c[:r_c]
// Both expansions write every row of their output and never read what it held (the caller then
// adds the base GEMM into it with addmm_): the items also cover the rows without adapter
// and the rows of rank-0 clients, which get the bias (forward) or zeros (dx), so the
// output may start as uninitialised memory.
// Backward, phase 2, one item per (trainable client c, column block of dA_c or dB_c):
//   dA_c[:r_c, cols] = sum over c's rows of G^T X,  dB_c[cols, :r_c] = s_c sum dY^T H.
// An item owns its whole output block across all of the client's rows, so its squared sum
// is the squared sum of the final gradient; the per-item partials are reduced in a fixed
// order, which makes grad_sqnorm independent of the thread count and schedule.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/lora_checks.h"
#include "microkernels.h"

namespace fedhello::cpu {
namespace {

constexpr int64_t kTileRows = 32;       // rows per (client, row-tile) item
constexpr int64_t kGradCols = 128;      // columns per weight-gradient item
constexpr int64_t kGradRows = 64;       // rows converted at a time inside a weight-gradient item
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

// Adapters of the active clients in fp32 and in the layouts the micro-kernels stream:
// a32[c][j][k] = A_c[j, k] and bt32[c][j][n] = B_c[n, j], for j < r_c.
struct PackedAdapters {
  const float* a32;
  const float* bt32;
  at::Tensor a_storage;  // empty when lora_a is float32 and a32 points into it
  at::Tensor bt_storage;
};

struct RowTile {
  int32_t client;  // num_clients for a tile of rows without adapter
  int32_t begin;  // positions in sorted_rows
  int32_t end;
};

struct GradItem {
  int32_t client;
  bool is_b;  // false: a column block of dA_c (over d_in), true: of dB_c (over d_out)
  int64_t col0;
  int64_t col1;
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

template <typename T>
struct WeightGrad {
  const Routing* route;
  const T* x;
  const T* dy;
  const float* g;  // [T][r_max] by position, already scaled by s_c
  const float* h;  // [T][r_max] by position
  T* d_a;          // [N][r_max][d_in]
  T* d_b;          // [N][d_out][r_max]
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

// dst = round(delta + bias) with the sum in fp32 and one rounding into the output dtype, as
// the Triton backend's expand does; a null delta or bias stands for zeros. dst is only written.
template <typename T>
inline void write_rounded(T* dst, const float* delta, const float* bias, int64_t n) {
  if (delta != nullptr && bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(delta[i] + bias[i]);
  } else if (delta != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(delta[i]);
  } else if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bias[i]);
  } else {
    std::fill(dst, dst + n, static_cast<T>(0.f));
  }
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
// Tile loops over the micro-kernels.

// p[i * ldp + j] = scale * <z[i], m[j * ldm]> for i < n_rows, j < rank.
template <int W>
inline void dot_tile(const float* const* z, int64_t n_rows, const float* m, int64_t ldm, int rank,
                     int64_t k_len, float scale, float* p, int64_t ldp) {
  for (int64_t i0 = 0; i0 < n_rows; i0 += kRowBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, n_rows - i0));
    const float* zb[kRowBlock];
    for (int i = 0; i < kRowBlock; ++i) zb[i] = z[i0 + std::min(i, rows - 1)];
    for (int j0 = 0; j0 < rank; j0 += kRankBlock) {
      const int jb = std::min(kRankBlock, rank - j0);
      const float* mb[kRankBlock];
      for (int j = 0; j < kRankBlock; ++j) mb[j] = m + (j0 + std::min(j, jb - 1)) * ldm;
      float* pb = p + i0 * ldp + j0;
      switch (jb) {
        case 4: dot_block<W, 4>(zb, mb, k_len, scale, pb, ldp, rows); break;
        case 3: dot_block<W, 3>(zb, mb, k_len, scale, pb, ldp, rows); break;
        case 2: dot_block<W, 2>(zb, mb, k_len, scale, pb, ldp, rows); break;
        default: dot_block<W, 1>(zb, mb, k_len, scale, pb, ldp, rows); break;
      }
    }
  }
}

// dst[i][0:n_cols] += sum_j (scale * p[i * ldp + j]) * m[j * ldm + 0:n_cols], i < n_rows.
template <int W>
inline void axpy_tile(const float* p, int64_t ldp, int64_t n_rows, int rank, const float* m, int64_t ldm,
                      int64_t n_cols, float scale, float* const* dst) {
  for (int64_t i0 = 0; i0 < n_rows; i0 += kRowBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, n_rows - i0));
    const float* pb[kRowBlock];
    float* db[kRowBlock];
    for (int i = 0; i < kRowBlock; ++i) {
      const int64_t r = i0 + std::min(i, rows - 1);
      pb[i] = p + r * ldp;
      db[i] = dst[r];
    }
    int64_t n0 = 0;
    for (; n0 + 4 * W <= n_cols; n0 += 4 * W) axpy_block<W, 4>(pb, rank, m, ldm, n0, scale, db, rows);
    for (; n0 + W <= n_cols; n0 += W) axpy_block<W, 1>(pb, rank, m, ldm, n0, scale, db, rows);
    axpy_tail(pb, rank, m, ldm, n0, n_cols, scale, db, rows);
  }
}

template <int W, int NV>
inline void outer_ranks(int jb, const float* const* p, int j0, const float* const* z, int64_t rows, int64_t n0,
                        float* q, int64_t ldq) {
  switch (jb) {
    case 4: outer_block<W, 4, NV>(p, j0, z, rows, n0, q, ldq); break;
    case 3: outer_block<W, 3, NV>(p, j0, z, rows, n0, q, ldq); break;
    case 2: outer_block<W, 2, NV>(p, j0, z, rows, n0, q, ldq); break;
    default: outer_block<W, 1, NV>(p, j0, z, rows, n0, q, ldq); break;
  }
}

// q[j * ldq + n] += sum_t p[t][j] * z[t][n] for j < rank, n < n_cols.
template <int W>
inline void outer_tile(const float* const* p, int rank, const float* const* z, int64_t rows, int64_t n_cols,
                       float* q, int64_t ldq) {
  for (int j0 = 0; j0 < rank; j0 += kRankBlock) {
    const int jb = std::min(kRankBlock, rank - j0);
    int64_t n0 = 0;
    for (; n0 + 4 * W <= n_cols; n0 += 4 * W) outer_ranks<W, 4>(jb, p, j0, z, rows, n0, q, ldq);
    for (; n0 + W <= n_cols; n0 += W) outer_ranks<W, 1>(jb, p, j0, z, rows, n0, q, ldq);
    outer_tail(p, j0, j0 + jb, z, rows, n0, n_cols, q, ldq);
  }
}

// ---------------------------------------------------------------------------------------
// Work items.

template <int W, typename T>
inline void shrink_expand_tile(const ShrinkExpand<T>& op, const RowTile& tile, Scratch& s) {
  const Routing& rt = *op.route;
  const int64_t c = tile.client;
  const bool lora = rt.active(c);  // else the rows only get the bias (or zeros)
  const int64_t n = tile.end - tile.begin;
  const int32_t* rows = rt.sorted_rows + tile.begin;
  float* p = op.p + tile.begin * rt.r_max;
  if (lora) {
    const float** z = s.zrows.data();
    gather_rows(op.z, op.k_len, rows, n, 0, op.k_len, s.z.data(), z);
    dot_tile<W>(z, n, op.m1 + c * rt.r_max * op.k_len, op.k_len, rt.ranks[c], op.k_len,
                op.scale_p ? rt.scaling[c] : 1.f, p, rt.r_max);
  }
  if (op.target == nullptr) return;
  // fp32 rows start as the bias (or zeros) in place and the expansion adds onto them there;
  // 16-bit rows accumulate in an fp32 scratch row and are stored once as round(delta + bias).
  float** dst = s.drows.data();
  for (int64_t i = 0; i < n; ++i) {
    T* row = op.target + static_cast<int64_t>(rows[i]) * op.n_len;
    if constexpr (std::is_same_v<T, float>) {
      write_rounded(row, nullptr, op.bias32, op.n_len);
      dst[i] = row;
    } else if (lora) {
      dst[i] = s.acc.data() + i * op.n_len;
      std::memset(dst[i], 0, sizeof(float) * op.n_len);
    } else {
      write_rounded(row, nullptr, op.bias32, op.n_len);
    }
  }
  if (!lora) return;
  axpy_tile<W>(p, rt.r_max, n, rt.ranks[c], op.m2 + c * rt.r_max * op.n_len, op.n_len, op.n_len,
               op.scale_out ? rt.scaling[c] : 1.f, dst);
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) {
      write_rounded(op.target + static_cast<int64_t>(rows[i]) * op.n_len, dst[i], op.bias32, op.n_len);
    }
  }
}

// Writes one complete column block of dA_c or dB_c; returns its squared Frobenius norm.
template <int W, typename T>
inline double weight_grad_item(const WeightGrad<T>& op, const GradItem& it, Scratch& s) {
  const Routing& rt = *op.route;
  const int64_t c = it.client;
  const int rank = rt.ranks[c];
  const T* z = it.is_b ? op.dy : op.x;
  const int64_t ld = it.is_b ? rt.d_out : rt.d_in;
  const float* p = it.is_b ? op.h : op.g;
  const int64_t width = it.col1 - it.col0;
  float* q = s.acc.data();
  std::fill(q, q + rank * width, 0.f);
  for (int64_t pos = rt.offsets[c]; pos < rt.offsets[c + 1]; pos += kGradRows) {
    const int64_t n = std::min<int64_t>(kGradRows, rt.offsets[c + 1] - pos);
    gather_rows(z, ld, rt.sorted_rows + pos, n, it.col0, width, s.z.data(), s.zrows.data());
    for (int64_t t = 0; t < n; ++t) s.prows[t] = p + (pos + t) * rt.r_max;
    outer_tile<W>(s.prows.data(), rank, s.zrows.data(), n, width, q, width);
  }
  const float scale = it.is_b ? rt.scaling[c] : 1.f;
  double sq = 0.0;
  for (int j = 0; j < rank; ++j) {
    for (int64_t col = 0; col < width; ++col) {
      const float v = scale * q[j * width + col];
      sq += static_cast<double>(v) * v;
      if (it.is_b) {
        op.d_b[(c * rt.d_out + it.col0 + col) * rt.r_max + j] = static_cast<T>(v);
      } else {
        op.d_a[(c * rt.r_max + j) * rt.d_in + it.col0 + col] = static_cast<T>(v);
      }
    }
  }
  return sq;
}

// ---------------------------------------------------------------------------------------
// One copy of the item functions per instruction set; `flatten` inlines the whole
// micro-kernel tree into each copy so that all of it is compiled for that target.

template <typename T>
using TileFn = void (*)(const ShrinkExpand<T>&, const RowTile&, Scratch&);
template <typename T>
using GradFn = double (*)(const WeightGrad<T>&, const GradItem&, Scratch&);

#define FEDHELLO_ISA_VARIANT(NAME, ATTRS, WIDTH)                                                           \
  template <typename T>                                                                                    \
  ATTRS void shrink_expand_##NAME(const ShrinkExpand<T>& op, const RowTile& tile, Scratch& s) {            \
    shrink_expand_tile<WIDTH, T>(op, tile, s);                                                             \
  }                                                                                                        \
  template <typename T>                                                                                    \
  ATTRS double weight_grad_##NAME(const WeightGrad<T>& op, const GradItem& it, Scratch& s) {               \
    return weight_grad_item<WIDTH, T>(op, it, s);                                                          \
  }

FEDHELLO_ISA_VARIANT(baseline, __attribute__((flatten)), 4)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FEDHELLO_X86_DISPATCH 1
FEDHELLO_ISA_VARIANT(avx2, __attribute__((target("avx2,fma,f16c"), flatten)), 8)
FEDHELLO_ISA_VARIANT(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten)), 16)
#endif
#undef FEDHELLO_ISA_VARIANT

enum class SimdLevel { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

const char* simd_name(SimdLevel s) {
  switch (s) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    default: return "baseline";
  }
}

SimdLevel best_supported_simd() {
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

SimdLevel& active_simd() {
  static SimdLevel level = best_supported_simd();
  return level;
}

template <typename T>
TileFn<T> tile_fn() {
  switch (active_simd()) {
#ifdef FEDHELLO_X86_DISPATCH
    case SimdLevel::kAvx512: return &shrink_expand_avx512<T>;
    case SimdLevel::kAvx2: return &shrink_expand_avx2<T>;
#endif
    default: return &shrink_expand_baseline<T>;
  }
}

template <typename T>
GradFn<T> grad_fn() {
  switch (active_simd()) {
#ifdef FEDHELLO_X86_DISPATCH
    case SimdLevel::kAvx512: return &weight_grad_avx512<T>;
    case SimdLevel::kAvx2: return &weight_grad_avx2<T>;
#endif
    default: return &weight_grad_baseline<T>;
  }
}

// ---------------------------------------------------------------------------------------
// Parallel driver.

int plan_threads(int64_t n_items, double work) {
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

std::vector<Scratch> make_scratch(int threads, int64_t z_elems, int64_t acc_elems, int64_t max_rows) {
  std::vector<Scratch> s;
  s.reserve(threads);
  for (int i = 0; i < threads; ++i) s.emplace_back(z_elems, acc_elems, max_rows);
  return s;
}

// Tiles of the active clients' rows; with all_rows also of every other row (bucket c =
// num_clients: positions [0, offsets[0]), the rows without adapter), so that an expansion
// writes the whole output.
std::vector<RowTile> row_tiles(const Routing& rt, bool all_rows) {
  std::vector<RowTile> tiles;
  for (int64_t c = 0; c <= rt.num_clients; ++c) {
    if (!all_rows && !rt.active(c)) continue;
    const int64_t begin = c < rt.num_clients ? rt.offsets[c] : 0;
    const int64_t end = c < rt.num_clients ? rt.offsets[c + 1] : rt.offsets[0];
    for (int64_t b = begin; b < end; b += kTileRows) {
      const int64_t e = std::min<int64_t>(b + kTileRows, end);
      tiles.push_back({static_cast<int32_t>(c), static_cast<int32_t>(b), static_cast<int32_t>(e)});
    }
  }
  return tiles;
}

// Multiply-adds of the active rows plus, with all_rows, one store per element of the others.
double tile_work(const Routing& rt, int64_t k_len, int64_t n_len, bool all_rows) {
  double work = 0.0;
  int64_t plain_rows = rt.offsets[0];
  for (int64_t c = 0; c < rt.num_clients; ++c) {
    if (rt.active(c)) {
      work += static_cast<double>(rt.count(c)) * rt.ranks[c] * (k_len + n_len);
    } else {
      plain_rows += rt.count(c);
    }
  }
  return all_rows ? work + static_cast<double>(plain_rows) * n_len : work;
}

template <typename T>
PackedAdapters pack_adapters(const Routing& rt, const at::Tensor& lora_a, const at::Tensor& lora_b) {
  PackedAdapters pk;
  const auto f32 = lora_a.options().dtype(at::kFloat);
  if constexpr (std::is_same_v<T, float>) {
    pk.a32 = lora_a.data_ptr<float>();
  } else {
    pk.a_storage = at::empty({rt.num_clients, rt.r_max, rt.d_in}, f32);
    pk.a32 = pk.a_storage.data_ptr<float>();
  }
  pk.bt_storage = at::empty({rt.num_clients, rt.r_max, rt.d_out}, f32);
  pk.bt32 = pk.bt_storage.data_ptr<float>();
  const T* a = lora_a.data_ptr<T>();
  const T* b = lora_b.data_ptr<T>();
  float* bt32 = pk.bt_storage.data_ptr<float>();
  for (int64_t c = 0; c < rt.num_clients; ++c) {
    if (!rt.active(c)) continue;
    const int64_t rank = rt.ranks[c];
    if constexpr (!std::is_same_v<T, float>) {
      to_float(a + c * rt.r_max * rt.d_in, rank * rt.d_in, pk.a_storage.data_ptr<float>() + c * rt.r_max * rt.d_in);
    }
    const T* bc = b + c * rt.d_out * rt.r_max;
    float* btc = bt32 + c * rt.r_max * rt.d_out;
    for (int64_t n = 0; n < rt.d_out; ++n) {
      for (int64_t j = 0; j < rank; ++j) btc[j * rt.d_out + n] = static_cast<float>(bc[n * rt.r_max + j]);
    }
  }
  return pk;
}

template <typename T>
void run_shrink_expand(const ShrinkExpand<T>& op) {
  const Routing& rt = *op.route;
  const bool all_rows = op.target != nullptr;
  const std::vector<RowTile> tiles = row_tiles(rt, all_rows);
  const int threads =
      plan_threads(static_cast<int64_t>(tiles.size()), tile_work(rt, op.k_len, op.n_len, all_rows));
  const bool convert = !std::is_same_v<T, float>;
  auto scratch = make_scratch(threads, convert ? kTileRows * op.k_len : 0,
                              convert && op.target != nullptr ? kTileRows * op.n_len : 0, kTileRows);
  const TileFn<T> fn = tile_fn<T>();
  for_each_item(static_cast<int64_t>(tiles.size()), threads, scratch,
                [&](int64_t i, Scratch& s) { fn(op, tiles[i], s); });
}

Routing make_routing(const LoRASizes& sz, const at::Tensor& sorted_rows, const at::Tensor& offsets,
                     const at::Tensor& scaling, const at::Tensor& ranks, const bool* trainable) {
  return Routing{sz.rows, sz.d_in, sz.d_out, sz.num_clients, sz.r_max, sorted_rows.data_ptr<int32_t>(),
                 offsets.data_ptr<int32_t>(), scaling.data_ptr<float>(), ranks.data_ptr<int32_t>(), trainable};
}

// The plan and ranks come from Python objects that a caller could build by hand; check
// the values the kernels use as addresses (O(T + N)) before any thread starts. The
// expansions write each row once, at its position in sorted_rows, so sorted_rows must be
// a permutation of [0, T) for every output row to be written.
void check_routing_values(const Routing& rt) {
  TORCH_CHECK_VALUE(rt.offsets[0] >= 0 && rt.offsets[rt.num_clients] == rt.rows,
                    "plan: expected offsets[0] >= 0 and offsets[N] = T = ", rt.rows, ", got offsets[0] = ",
                    rt.offsets[0], " and offsets[N] = ", rt.offsets[rt.num_clients]);
  for (int64_t c = 0; c < rt.num_clients; ++c) {
    TORCH_CHECK_VALUE(rt.offsets[c] <= rt.offsets[c + 1], "plan: expected non-decreasing offsets, got offsets[",
                      c, "] = ", rt.offsets[c], " > offsets[", c + 1, "] = ", rt.offsets[c + 1]);
    TORCH_CHECK_VALUE(rt.ranks[c] >= 0 && rt.ranks[c] <= rt.r_max, "ranks: expected values in [0, r_max=",
                      rt.r_max, "], got ", rt.ranks[c], " for client ", c);
  }
  std::vector<bool> seen(rt.rows, false);
  for (int64_t p = 0; p < rt.rows; ++p) {
    const int32_t row = rt.sorted_rows[p];
    TORCH_CHECK_VALUE(row >= 0 && row < rt.rows, "plan: expected sorted_rows in [0, T = ", rt.rows, "), got ", row,
                      " at position ", p);
    TORCH_CHECK_VALUE(!seen[row], "plan: expected sorted_rows to be a permutation of [0, T), got row ", row,
                      " twice (at position ", p, ")");
    seen[row] = true;
  }
}

// Calls f(T{}) with T the C++ type of dt (float, c10::Half or c10::BFloat16; checked before).
template <typename F>
void dispatch_dtype(at::ScalarType dt, const F& f) {
  switch (dt) {
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;
  }
}

void check_cpu(const at::Tensor& x2d) {
  TORCH_CHECK_VALUE(x2d.device().is_cpu(), "x2d: expected a CPU tensor, got one on ", x2d.device());
}

// ---------------------------------------------------------------------------------------
// Entry points.

at::Tensor lora_forward(const at::Tensor& x2d, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& sorted_rows, const at::Tensor& offsets, const at::Tensor& scaling,
                        const at::Tensor& ranks, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  check_cpu(x2d);
  const LoRASizes sz = check_forward_args(x2d, lora_a, lora_b, sorted_rows, offsets, scaling, ranks, out);
  check_bias(sz, x2d, bias);
  const Routing rt = make_routing(sz, sorted_rows, offsets, scaling, ranks, nullptr);
  check_routing_values(rt);
  at::Tensor h = at::empty({sz.rows, sz.r_max}, x2d.options().dtype(at::kFloat));
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias32 = has_bias ? bias->to(at::kFloat) : at::Tensor();  // no copy for float32
  dispatch_dtype(x2d.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const PackedAdapters pk = pack_adapters<scalar_t>(rt, lora_a, lora_b);
    const ShrinkExpand<scalar_t> op{&rt,     x2d.data_ptr<scalar_t>(), sz.d_in, pk.a32, false, h.data_ptr<float>(),
                                    pk.bt32, sz.d_out,                 true,
                                    has_bias ? bias32.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>()};
    run_shrink_expand(op);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> lora_backward(const at::Tensor& dy2d, const at::Tensor& x2d,
                                                 const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                 const at::Tensor& sorted_rows, const at::Tensor& offsets,
                                                 const at::Tensor& scaling, const at::Tensor& ranks,
                                                 const at::Tensor& trainable, const at::Tensor& saved,
                                                 std::optional<at::Tensor> dx, bool weight_grads,
                                                 std::optional<at::Tensor> grad_sqnorm) {
  check_cpu(x2d);
  const LoRASizes sz =
      check_forward_args(x2d, lora_a, lora_b, sorted_rows, offsets, scaling, ranks, dy2d, "dy2d");
  check_backward_args(sz, x2d, trainable, saved, dx, grad_sqnorm);
  const Routing rt = make_routing(sz, sorted_rows, offsets, scaling, ranks, trainable.data_ptr<bool>());
  check_routing_values(rt);
  const bool has_dx = dx.has_value() && dx->defined();
  at::Tensor d_a, d_b;
  if (!has_dx && !weight_grads) return {d_a, d_b};
  if (weight_grads) {
    d_a = at::zeros_like(lora_a);
    d_b = at::zeros_like(lora_b);
  }
  dispatch_dtype(x2d.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const PackedAdapters pk = pack_adapters<scalar_t>(rt, lora_a, lora_b);
    at::Tensor g = at::empty({sz.rows, sz.r_max}, x2d.options().dtype(at::kFloat));
    const ShrinkExpand<scalar_t> op{&rt,     dy2d.data_ptr<scalar_t>(), sz.d_out, pk.bt32, true, g.data_ptr<float>(),
                                    pk.a32,  sz.d_in,                   false,    nullptr,
                                    has_dx ? dx->data_ptr<scalar_t>() : nullptr};
    run_shrink_expand(op);
    if (!weight_grads) return;

    std::vector<GradItem> items;
    for (int64_t c = 0; c < rt.num_clients; ++c) {
      if (!rt.active(c) || !rt.trainable[c]) continue;
      for (int64_t c0 = 0; c0 < sz.d_in; c0 += kGradCols) {
        items.push_back({static_cast<int32_t>(c), false, c0, std::min(c0 + kGradCols, sz.d_in)});
      }
      for (int64_t c0 = 0; c0 < sz.d_out; c0 += kGradCols) {
        items.push_back({static_cast<int32_t>(c), true, c0, std::min(c0 + kGradCols, sz.d_out)});
      }
    }
    // Biggest items first so that the dynamic schedule ends evenly; each item's result
    // does not depend on when it runs.
    std::stable_sort(items.begin(), items.end(), [&](const GradItem& a, const GradItem& b) {
      return rt.count(a.client) * rt.ranks[a.client] > rt.count(b.client) * rt.ranks[b.client];
    });
    double work = 0.0;
    for (const GradItem& it : items) work += static_cast<double>(rt.count(it.client)) * rt.ranks[it.client] * (it.col1 - it.col0);
    const int threads = plan_threads(static_cast<int64_t>(items.size()), work);
    const bool convert = !std::is_same_v<scalar_t, float>;
    auto scratch = make_scratch(threads, convert ? kGradRows * kGradCols : 0, sz.r_max * kGradCols, kGradRows);
    const WeightGrad<scalar_t> wg{&rt, x2d.data_ptr<scalar_t>(), dy2d.data_ptr<scalar_t>(), g.data_ptr<float>(),
                                  saved.data_ptr<float>(), d_a.data_ptr<scalar_t>(), d_b.data_ptr<scalar_t>()};
    const GradFn<scalar_t> fn = grad_fn<scalar_t>();
    std::vector<double> partial(items.size(), 0.0);
    for_each_item(static_cast<int64_t>(items.size()), threads, scratch,
                  [&](int64_t i, Scratch& s) { partial[i] = fn(wg, items[i], s); });
    if (grad_sqnorm.has_value() && grad_sqnorm->defined()) {
      std::vector<double> per_client(rt.num_clients, 0.0);
      std::vector<bool> touched(rt.num_clients, false);
      // Items were sorted stably, so each client's partials are summed in the same order on every call.
      for (size_t i = 0; i < items.size(); ++i) {
        per_client[items[i].client] += partial[i];
        touched[items[i].client] = true;
      }
      float* sq = grad_sqnorm->data_ptr<float>();
      for (int64_t c = 0; c < rt.num_clients; ++c) {
        if (touched[c]) sq[c] += static_cast<float>(per_client[c]);
      }
    }
  });
  return {d_a, d_b};
}

std::string get_simd_level() { return simd_name(active_simd()); }

void set_simd_level(const std::string& name) {
  const SimdLevel best = best_supported_simd();
  SimdLevel want;
  if (name == "avx512") {
    want = SimdLevel::kAvx512;
  } else if (name == "avx2") {
    want = SimdLevel::kAvx2;
  } else if (name == "baseline") {
    want = SimdLevel::kBaseline;
  } else {
    TORCH_CHECK_VALUE(false, "name: expected 'avx512', 'avx2' or 'baseline', got '", name, "'");
  }
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "name: '", name,
                    "' is not supported by this CPU (best: '", simd_name(best), "')");
  active_simd() = want;
}

}  // namespace
}  // namespace fedhello::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fedhello CPU kernels for the LoRA part of multi_lora_linear (see fedhello/kernels/extension.py)";
  m.def("lora_forward", &fedhello::cpu::lora_forward, py::arg("x2d"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("sorted_rows"), py::arg("offsets"), py::arg("scaling"), py::arg("ranks"), py::arg("bias"),
        py::arg("out"), py::call_guard<py::gil_scoped_release>(),
        "Writes out[row] = bias + s_c (x[row] A_c[:r_c]^T) B_c[:, :r_c]^T for every row (bias, or zeros when "
        "bias is None, on rows without adapter); out is never read. Returns H, fp32 [T, r_max] by plan position.");
  m.def("lora_backward", &fedhello::cpu::lora_backward, py::arg("dy2d"), py::arg("x2d"), py::arg("lora_a"),
        py::arg("lora_b"), py::arg("sorted_rows"), py::arg("offsets"), py::arg("scaling"), py::arg("ranks"),
        py::arg("trainable"), py::arg("saved"), py::arg("dx"), py::arg("weight_grads"), py::arg("grad_sqnorm"),
        py::call_guard<py::gil_scoped_release>(),
        "Writes dx[row] = G A_c for every row, zeros on rows without adapter (when dx is given; never read); "
        "returns (dA, dB), undefined (None) unless weight_grads; "
        "grad_sqnorm[c] += ||dA_c||^2 + ||dB_c||^2 for trainable clients.");
  m.def("simd_level", &fedhello::cpu::get_simd_level, "Instruction set the kernels run with: avx512, avx2 or baseline.");
  m.def("set_simd_level", &fedhello::cpu::set_simd_level, py::arg("name"),
        "Use a narrower instruction set than the best one this CPU supports (for tests and benchmarks).");
}
