// Weight-gradient pass of the CPU backend (phase 2 of the backward), one item per
// (trainable client c, column block of dA_c or dB_c):
//   dA_c[:r_c, cols] = sum over c's rows of G^T X,  dB_c[cols, :r_c] = s_c sum dY^T H.
// An item owns its whole output block across all of the client's rows, so its squared sum
// is the squared sum of the final gradient; the per-item partials are reduced in a fixed
// order, which makes grad_sqnorm independent of the thread count and schedule.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "lora_cpu.h"
#include "microkernels.h"

namespace fedhello::cpu {
namespace {

constexpr int64_t kGradCols = 128;  // columns per weight-gradient item
constexpr int64_t kGradRows = 64;   // rows converted at a time inside a weight-gradient item

struct GradItem {
  int32_t client;
  bool is_b;  // false: a column block of dA_c (over d_in), true: of dB_c (over d_out)
  int64_t col0;
  int64_t col1;
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

#define FEDHELLO_ISA_VARIANT(NAME, ATTRS, WIDTH)                                              \
  template <typename T>                                                                       \
  ATTRS double weight_grad_##NAME(const WeightGrad<T>& op, const GradItem& it, Scratch& s) { \
    return weight_grad_item<WIDTH, T>(op, it, s);                                             \
  }
FEDHELLO_FOR_EACH_ISA(FEDHELLO_ISA_VARIANT)
#undef FEDHELLO_ISA_VARIANT

// The column blocks of dA_c and dB_c of every active trainable client, biggest first so that
// the dynamic schedule ends evenly; each item's result does not depend on when it runs.
std::vector<GradItem> grad_items(const Routing& rt) {
  std::vector<GradItem> items;
  for (int64_t c = 0; c < rt.num_clients; ++c) {
    if (!rt.active(c) || !rt.trainable[c]) continue;
    for (int64_t c0 = 0; c0 < rt.d_in; c0 += kGradCols) {
      items.push_back({static_cast<int32_t>(c), false, c0, std::min(c0 + kGradCols, rt.d_in)});
    }
    for (int64_t c0 = 0; c0 < rt.d_out; c0 += kGradCols) {
      items.push_back({static_cast<int32_t>(c), true, c0, std::min(c0 + kGradCols, rt.d_out)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [&](const GradItem& a, const GradItem& b) {
    return rt.count(a.client) * rt.ranks[a.client] > rt.count(b.client) * rt.ranks[b.client];
  });
  return items;
}

}  // namespace

template <typename T>
void run_weight_grads(const Routing& rt, const T* x, const T* dy, const float* g, const float* h, T* d_a, T* d_b,
                      float* grad_sqnorm) {
  const std::vector<GradItem> items = grad_items(rt);
  double work = 0.0;
  for (const GradItem& it : items) {
    work += static_cast<double>(rt.count(it.client)) * rt.ranks[it.client] * (it.col1 - it.col0);
  }
  const int threads = plan_threads(static_cast<int64_t>(items.size()), work);
  const bool convert = !std::is_same_v<T, float>;
  auto scratch = make_scratch(threads, convert ? kGradRows * kGradCols : 0, rt.r_max * kGradCols, kGradRows);
  const WeightGrad<T> wg{&rt, x, dy, g, h, d_a, d_b};
  const auto fn = FEDHELLO_ACTIVE_VARIANT(weight_grad, T);
  std::vector<double> partial(items.size(), 0.0);
  for_each_item(static_cast<int64_t>(items.size()), threads, scratch,
                [&](int64_t i, Scratch& s) { partial[i] = fn(wg, items[i], s); });
  if (grad_sqnorm != nullptr) {
    std::vector<double> per_client(rt.num_clients, 0.0);
    std::vector<bool> touched(rt.num_clients, false);
    // Items were sorted stably, so each client's partials are summed in the same order on every call.
    for (size_t i = 0; i < items.size(); ++i) {
      per_client[items[i].client] += partial[i];
      touched[items[i].client] = true;
    }
    for (int64_t c = 0; c < rt.num_clients; ++c) {
      if (touched[c]) grad_sqnorm[c] += static_cast<float>(per_client[c]);
    }
  }
}

#define FEDHELLO_INSTANTIATE(T)                                                                                 \
  template void run_weight_grads<T>(const Routing&, const T*, const T*, const float*, const float*, T*, T*, float*);
FEDHELLO_INSTANTIATE(float)
FEDHELLO_INSTANTIATE(c10::Half)
FEDHELLO_INSTANTIATE(c10::BFloat16)
#undef FEDHELLO_INSTANTIATE

}  // namespace fedhello::cpu
