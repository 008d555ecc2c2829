// Shrink-expand pass of the CPU backend: the forward and phase 1 of the backward, one item
// per (client c, tile of c's rows in plan order), fp32 accumulation and an fp32 rank
// intermediate whatever the input dtype:
//   forward   H[pos, :r_c] = X[row] A_c[:r_c]^T            (kept in fp32, returned for the backward)
//             out[row]     = bias + s_c H[pos, :r_c] B_c[:, :r_c]^T
//   backward  G[pos, :r_c] = s_c dY[row] B_c[:, :r_c]      (fp32)
//             dx[row]      = G[pos, :r_c] A_c[:r_c]
// Both expansions write every row of their output and never read what it held (the caller then
// adds the base GEMM into it with addmm_): the items also cover the rows without adapter
// and the rows of rank-0 clients, which get the bias (forward) or zeros (dx), so the
// output may start as uninitialised memory.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lora_cpu.h"
#include "microkernels.h"

namespace fedhello::cpu {
namespace {

constexpr int64_t kTileRows = 32;  // rows per (client, row-tile) item

struct RowTile {
  int32_t client;  // num_clients for a tile of rows without adapter
  int32_t begin;  // positions in sorted_rows
  int32_t end;
};

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

// ---------------------------------------------------------------------------------------
// Work item.

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

#define FEDHELLO_ISA_VARIANT(NAME, ATTRS, WIDTH)                                                \
  template <typename T>                                                                         \
  ATTRS void shrink_expand_##NAME(const ShrinkExpand<T>& op, const RowTile& tile, Scratch& s) { \
    shrink_expand_tile<WIDTH, T>(op, tile, s);                                                  \
  }
FEDHELLO_FOR_EACH_ISA(FEDHELLO_ISA_VARIANT)
#undef FEDHELLO_ISA_VARIANT

// ---------------------------------------------------------------------------------------
// Driver.

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

}  // namespace

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
  const auto fn = FEDHELLO_ACTIVE_VARIANT(shrink_expand, T);
  for_each_item(static_cast<int64_t>(tiles.size()), threads, scratch,
                [&](int64_t i, Scratch& s) { fn(op, tiles[i], s); });
}

template void run_shrink_expand<float>(const ShrinkExpand<float>&);
template void run_shrink_expand<c10::Half>(const ShrinkExpand<c10::Half>&);
template void run_shrink_expand<c10::BFloat16>(const ShrinkExpand<c10::BFloat16>&);

}  // namespace fedhello::cpu
