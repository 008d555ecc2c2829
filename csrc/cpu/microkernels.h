// Register-blocked fp32 micro-kernels of the CPU backend.
//
// Every kernel is written once over GCC/Clang vector extensions of W floats. The
// passes (shrink_expand.cpp, weight_grad.cpp) instantiate them with W = 16, 8 or 4 inside functions
// compiled for AVX-512, AVX2 or the baseline ISA and pick one at run time, so one
// binary uses the widest vectors of whatever CPU it runs on.
//
// Shapes are tiny in one direction (the rank, <= r_max) and long in the other (d_in or
// d_out), so each kernel keeps a 4 x 4 block of vector accumulators in registers and
// streams the long direction: 8 loads feed 16 FMAs.
//
// Row blocks always have 4 row pointers; callers pass duplicates of a valid row for the
// missing ones at the edge of a tile and tell the kernel how many rows to write.
#pragma once

#include <cstdint>

namespace fedhello::cpu {

template <int W>
struct Simd {
  typedef float vec __attribute__((vector_size(sizeof(float) * W)));
  // Unaligned, aliasing view used for loads and stores from plain float arrays.
  typedef float uvec __attribute__((vector_size(sizeof(float) * W), aligned(alignof(float)), may_alias));

  static inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
  static inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
  static inline vec splat(float s) { return vec{} + s; }
  static inline vec zero() { return vec{}; }
  static inline float sum(vec v) {
    // Pairwise halving: a fixed order, so results do not depend on the thread count.
    float lanes[W];
    store(lanes, v);
    for (int width = W / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    }
    return lanes[0];
  }
};

constexpr int kRowBlock = 4;   // rows held in registers by every kernel
constexpr int kRankBlock = 4;  // rank columns held in registers by the dot and outer kernels

// p[i * ldp + j] = scale * <z[i][0:k_len], m[j][0:k_len]> for i < rows, j < JB.
template <int W, int JB>
inline void dot_block(const float* const* z, const float* const* m, int64_t k_len, float scale,
                      float* p, int64_t ldp, int rows) {
  using S = Simd<W>;
  using V = typename S::vec;
  V acc[kRowBlock][JB];
  for (int i = 0; i < kRowBlock; ++i)
    for (int j = 0; j < JB; ++j) acc[i][j] = S::zero();
  int64_t k = 0;
  for (; k + W <= k_len; k += W) {
    V zv[kRowBlock];
    for (int i = 0; i < kRowBlock; ++i) zv[i] = S::load(z[i] + k);
    for (int j = 0; j < JB; ++j) {
      const V mv = S::load(m[j] + k);
      for (int i = 0; i < kRowBlock; ++i) acc[i][j] += zv[i] * mv;
    }
  }
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < JB; ++j) {
      float s = S::sum(acc[i][j]);
      for (int64_t kk = k; kk < k_len; ++kk) s += z[i][kk] * m[j][kk];
      p[i * ldp + j] = scale * s;
    }
  }
}

// dst[i][n0 : n0 + NV*W] += sum_{j < rank} (scale * p[i][j]) * m[j][n0 : n0 + NV*W], i < rows.
template <int W, int NV>
inline void axpy_block(const float* const* p, int rank, const float* m, int64_t ldm, int64_t n0,
                       float scale, float* const* dst, int rows) {
  using S = Simd<W>;
  using V = typename S::vec;
  V acc[kRowBlock][NV];
  for (int i = 0; i < kRowBlock; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = S::zero();
  for (int j = 0; j < rank; ++j) {
    V mv[NV];
    for (int v = 0; v < NV; ++v) mv[v] = S::load(m + j * ldm + n0 + v * W);
    for (int i = 0; i < kRowBlock; ++i) {
      const V pv = S::splat(scale * p[i][j]);
      for (int v = 0; v < NV; ++v) acc[i][v] += pv * mv[v];
    }
  }
  for (int i = 0; i < rows; ++i) {
    for (int v = 0; v < NV; ++v) {
      float* d = dst[i] + n0 + v * W;
      S::store(d, S::load(d) + acc[i][v]);
    }
  }
}

// Scalar columns [n0, n_end) of axpy_block.
inline void axpy_tail(const float* const* p, int rank, const float* m, int64_t ldm, int64_t n0,
                      int64_t n_end, float scale, float* const* dst, int rows) {
  for (int i = 0; i < rows; ++i) {
    for (int64_t n = n0; n < n_end; ++n) {
      float s = 0.f;
      for (int j = 0; j < rank; ++j) s += (scale * p[i][j]) * m[j * ldm + n];
      dst[i][n] += s;
    }
  }
}

// q[(j0 + j) * ldq + n0 : ... + NV*W] += sum_t p[t][j0 + j] * z[t][n0 : n0 + NV*W], j < JB.
template <int W, int JB, int NV>
inline void outer_block(const float* const* p, int j0, const float* const* z, int64_t rows,
                        int64_t n0, float* q, int64_t ldq) {
  using S = Simd<W>;
  using V = typename S::vec;
  V acc[JB][NV];
  for (int j = 0; j < JB; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = S::load(q + (j0 + j) * ldq + n0 + v * W);
  for (int64_t t = 0; t < rows; ++t) {
    V zv[NV];
    for (int v = 0; v < NV; ++v) zv[v] = S::load(z[t] + n0 + v * W);
    for (int j = 0; j < JB; ++j) {
      const V pv = S::splat(p[t][j0 + j]);
      for (int v = 0; v < NV; ++v) acc[j][v] += pv * zv[v];
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int v = 0; v < NV; ++v) S::store(q + (j0 + j) * ldq + n0 + v * W, acc[j][v]);
}

// Scalar columns [n0, n_end) of outer_block, for ranks [j0, j_end).
inline void outer_tail(const float* const* p, int j0, int j_end, const float* const* z, int64_t rows,
                       int64_t n0, int64_t n_end, float* q, int64_t ldq) {
  for (int j = j0; j < j_end; ++j) {
    for (int64_t n = n0; n < n_end; ++n) {
      float s = q[j * ldq + n];
      for (int64_t t = 0; t < rows; ++t) s += p[t][j] * z[t][n];
      q[j * ldq + n] = s;
    }
  }
}

}  // namespace fedhello::cpu
