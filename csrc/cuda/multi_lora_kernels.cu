// CUDA kernels for the LoRA part of multi_lora_linear (docs/design.md, section 1).
//
// Launch grids depend only on the shapes and on the plan's fixed-size work list, never on
// the routing values, so every launch can be captured in a CUDA graph; items past the end
// of the list (client -1) and rank chunks past a client's rank exit at once. The list has
// items for the rows without adapter too (client N): only the expand uses them.
//
// shrink   P[pos, :r_c] = s? * Z[row] M_c[:r_c]^T, one block per (row tile, 16-rank chunk).
//          Forward H = X A_c^T; backward G = s_c dY B_c. fp16/bf16 inputs use tensor cores
//          (WMMA 16x16x16, the operands are the inputs themselves, fp32 accumulators);
//          fp32 inputs use fp32 FMAs.
// expand   Out[row] = bias + s? * P[pos, :r_c] M_c[:r_c], one block per (row tile, 64 columns).
//          Forward out = bias + s_c H B_c^T; backward dx = G A_c. Every row of Out is written
//          once and never read (rows without adapter and rows of rank-0 clients get the bias
//          or zeros), so Out may start uninitialised and the caller adds the base GEMM into
//          it with addmm_. A rank-r update of a row costs
//          r FMAs per element read and written, which is memory-bound at LoRA ranks, so it
//          runs on fp32 FMAs and P keeps its full fp32 precision.
// wgrad    dW_c[j, n] = s? * sum_t P[t, j] Z[t, n] over all rows of client c: one block owns
//          one complete 16 x 64 tile of dA_c or dB_c, so it can square and sum the final
//          values and write one fp32 partial; a small kernel adds the partials of each
//          client in a fixed order (deterministic, no atomics). fp16/bf16 inputs use TF32
//          tensor cores (P is fp32, so it is rounded to TF32, never to 16 bits).
//
// The tensor-core paths need sm_80 or newer; the launchers pick the FMA kernels elsewhere.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "multi_lora_cuda.h"

namespace fedhello::cuda {
namespace {

using namespace nvcuda;

constexpr int kRankChunk = 16;    // ranks per shrink / wgrad block
constexpr int kShrinkK = 32;      // reduction slice of the shrink
constexpr int kShrinkThreads = 128;
constexpr int kExpandCols = 64;
constexpr int kExpandThreads = 256;
constexpr int kGradCols = 64;
constexpr int kGradRows = 32;     // client rows staged per step of wgrad
constexpr int kGradThreadsFma = 256;
constexpr int kGradThreadsTc = 128;

// Conversions spelled out: torch builds define __CUDA_NO_HALF_CONVERSIONS__.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Element (j, k) of client c's matrix: base[c * c_stride + j * j_stride + k * k_stride].
struct MatView {
  int64_t c_stride;
  int64_t j_stride;
  int64_t k_stride;
};

// Row indices of the current tile (-1 past the end of its run: client c's, or for c == N
// the rows without adapter, positions [0, offsets[0])), loaded by the first threads.
__device__ __forceinline__ void load_tile_rows(const Routing& rt, int client, int start, int64_t* rows) {
  const int end = client < rt.num_clients ? rt.offsets[client + 1] : rt.offsets[0];
  if (threadIdx.x < kBlockM) {
    const int pos = start + static_cast<int>(threadIdx.x);
    rows[threadIdx.x] = pos < end ? static_cast<int64_t>(rt.sorted_rows[pos]) : -1;
  }
}

// ---------------------------------------------------------------------------------------
// shrink

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads)
    shrink_fma_kernel(const T* __restrict__ z, int64_t k_len, const T* __restrict__ m, MatView mv,
                      float* __restrict__ p, Routing rt, bool apply_scale) {
  const int item = blockIdx.x;
  const int client = rt.tile_client[item];
  if (client < 0 || client >= rt.num_clients) return;  // unused item, or rows without adapter
  const int rank = rt.ranks[client];
  const int j0 = blockIdx.y * kRankChunk;
  if (j0 >= rank) return;
  const int start = rt.tile_start[item];

  __shared__ int64_t rows[kBlockM];
  __shared__ float zs[kBlockM][kShrinkK + 1];
  __shared__ float ms[kRankChunk][kShrinkK + 1];
  load_tile_rows(rt, client, start, rows);
  __syncthreads();

  const int tid = threadIdx.x;
  const int jj = tid % kRankChunk;   // this thread's rank column
  const int r0 = tid / kRankChunk;   // and rows r0, r0 + 8, ..., r0 + 56
  constexpr int kRowsPerThread = kBlockM * kRankChunk / kShrinkThreads;
  constexpr int kRowStep = kShrinkThreads / kRankChunk;
  float acc[kRowsPerThread] = {};
  const T* mc = m + client * mv.c_stride;
  for (int64_t k0 = 0; k0 < k_len; k0 += kShrinkK) {
    for (int e = tid; e < kBlockM * kShrinkK; e += kShrinkThreads) {
      const int r = e / kShrinkK, kk = e % kShrinkK;
      const int64_t k = k0 + kk;
      zs[r][kk] = (rows[r] >= 0 && k < k_len) ? Elem<T>::to_float(z[rows[r] * k_len + k]) : 0.f;
    }
    for (int e = tid; e < kRankChunk * kShrinkK; e += kShrinkThreads) {
      const int j = e / kShrinkK, kk = e % kShrinkK;
      const int64_t k = k0 + kk;
      ms[j][kk] = (j0 + j < rank && k < k_len) ? Elem<T>::to_float(mc[(j0 + j) * mv.j_stride + k * mv.k_stride])
                                                : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kShrinkK; ++kk) {
      const float mval = ms[jj][kk];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += zs[r0 + i * kRowStep][kk] * mval;
    }
    __syncthreads();
  }
  const float scale = apply_scale ? rt.scaling[client] : 1.f;
  if (j0 + jj < rank) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = r0 + i * kRowStep;
      if (rows[r] >= 0) p[(start + r) * rt.r_max + j0 + jj] = scale * acc[i];
    }
  }
}

// Same contract as shrink_fma_kernel for T = __half / __nv_bfloat16 on tensor cores: each of
// the 4 warps computes a 16-row x 16-rank block of the 64 x 16 tile.
template <typename T>
__global__ void __launch_bounds__(kShrinkThreads)
    shrink_wmma_kernel(const T* __restrict__ z, int64_t k_len, const T* __restrict__ m, MatView mv,
                       float* __restrict__ p, Routing rt, bool apply_scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int item = blockIdx.x;
  const int client = rt.tile_client[item];
  if (client < 0 || client >= rt.num_clients) return;  // unused item, or rows without adapter
  const int rank = rt.ranks[client];
  const int j0 = blockIdx.y * kRankChunk;
  if (j0 >= rank) return;
  const int start = rt.tile_start[item];

  constexpr int kLd = kShrinkK + 8;          // 16-bit elements; rows stay 16-byte aligned for WMMA
  constexpr int kLdc = kRankChunk + 4;       // fp32 accumulator staging
  __shared__ int64_t rows[kBlockM];
  __shared__ __align__(32) T zs[kBlockM * kLd];
  __shared__ __align__(32) T ms[kRankChunk * kLd];
  __shared__ __align__(32) float cs[kBlockM * kLdc];
  load_tile_rows(rt, client, start, rows);
  __syncthreads();

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const T zero = Elem<T>::from_float(0.f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  const T* mc = m + client * mv.c_stride;
  for (int64_t k0 = 0; k0 < k_len; k0 += kShrinkK) {
    for (int e = tid; e < kBlockM * kShrinkK; e += kShrinkThreads) {
      const int r = e / kShrinkK, kk = e % kShrinkK;
      const int64_t k = k0 + kk;
      zs[r * kLd + kk] = (rows[r] >= 0 && k < k_len) ? z[rows[r] * k_len + k] : zero;
    }
    for (int e = tid; e < kRankChunk * kShrinkK; e += kShrinkThreads) {
      const int j = e / kShrinkK, kk = e % kShrinkK;
      const int64_t k = k0 + kk;
      ms[j * kLd + kk] = (j0 + j < rank && k < k_len) ? mc[(j0 + j) * mv.j_stride + k * mv.k_stride] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kShrinkK; kk += 16) {
      // A = Z rows (row-major), B(k, j) = M[j, k]: M's rows are B's columns (col-major).
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, zs + warp * 16 * kLd + kk, kLd);
      wmma::load_matrix_sync(b, ms + kk, kLd);
      wmma::mma_sync(acc, a, b, acc);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(cs + warp * 16 * kLdc, acc, kLdc, wmma::mem_row_major);
  __syncthreads();
  const float scale = apply_scale ? rt.scaling[client] : 1.f;
  for (int e = tid; e < kBlockM * kRankChunk; e += kShrinkThreads) {
    const int r = e / kRankChunk, j = e % kRankChunk;
    if (rows[r] >= 0 && j0 + j < rank) p[(start + r) * rt.r_max + j0 + j] = scale * cs[r * kLdc + j];
  }
#endif
}

// ---------------------------------------------------------------------------------------
// expand

// bias: [n_out] or nullptr (zeros). Items of rows without adapter (client N) run with rank 0.
template <typename T>
__global__ void __launch_bounds__(kExpandThreads)
    expand_kernel(const float* __restrict__ p, const T* __restrict__ m, MatView mv, const T* __restrict__ bias,
                  T* __restrict__ out, int64_t n_out, Routing rt, bool apply_scale) {
  const int item = blockIdx.x;
  const int client = rt.tile_client[item];
  if (client < 0) return;
  const bool routed = client < rt.num_clients;
  const int rank = routed ? rt.ranks[client] : 0;  // rank 0: the loop below adds nothing
  const int start = rt.tile_start[item];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kExpandCols;

  __shared__ int64_t rows[kBlockM];
  __shared__ float ps[kBlockM][kRankChunk + 1];
  __shared__ float ms[kRankChunk][kExpandCols];
  load_tile_rows(rt, client, start, rows);
  __syncthreads();

  const int tid = threadIdx.x;
  const int col = tid % kExpandCols;  // this thread's column
  const int r0 = tid / kExpandCols;   // and rows r0, r0 + 4, ..., r0 + 60
  constexpr int kRowStep = kExpandThreads / kExpandCols;
  constexpr int kRowsPerThread = kBlockM / kRowStep;
  float acc[kRowsPerThread] = {};
  const T* mc = m + client * mv.c_stride;
  for (int j0 = 0; j0 < rank; j0 += kRankChunk) {
    for (int e = tid; e < kBlockM * kRankChunk; e += kExpandThreads) {
      const int r = e / kRankChunk, j = e % kRankChunk;
      ps[r][j] = (rows[r] >= 0 && j0 + j < rank) ? p[(start + r) * rt.r_max + j0 + j] : 0.f;
    }
    for (int e = tid; e < kRankChunk * kExpandCols; e += kExpandThreads) {
      const int j = e / kExpandCols, c = e % kExpandCols;
      const int64_t n = n0 + c;
      ms[j][c] = (j0 + j < rank && n < n_out) ? Elem<T>::to_float(mc[(j0 + j) * mv.j_stride + n * mv.k_stride])
                                               : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) {
      const float mval = ms[j][col];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += ps[r0 + i * kRowStep][j] * mval;
    }
    __syncthreads();
  }
  const float scale = routed && apply_scale ? rt.scaling[client] : 1.f;
  const int64_t n = n0 + col;
  if (n >= n_out) return;
  // The fp32 sum of the LoRA term and the bias, rounded once, as in the Triton backend.
  const float b = bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = rows[r0 + i * kRowStep];
    if (row >= 0) out[row * n_out + n] = Elem<T>::from_float(scale * acc[i] + b);
  }
}

// ---------------------------------------------------------------------------------------
// wgrad

// Block-wide sum in a fixed order; every thread must call it.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

// Index of this block's squared-norm partial.
__device__ __forceinline__ int64_t partial_index(int64_t per_client, int64_t offset) {
  return blockIdx.x * per_client + offset + static_cast<int64_t>(blockIdx.y) * gridDim.z + blockIdx.z;
}

// out[c, j, n] (strides `ov`) = scale * sum over c's rows of P[pos, j] Z[row, n] for one
// 16 x 64 tile (j0 = 16 blockIdx.y, n0 = 64 blockIdx.z) of client c = blockIdx.x.
template <typename T>
__global__ void __launch_bounds__(kGradThreadsFma)
    wgrad_fma_kernel(const float* __restrict__ p, const T* __restrict__ z, int64_t n_out, T* __restrict__ out,
                     MatView ov, Routing rt, bool apply_scale, float* __restrict__ partial, int64_t per_client,
                     int64_t partial_offset) {
  const int client = blockIdx.x;
  const int rank = rt.ranks[client];
  const int j0 = blockIdx.y * kRankChunk;
  const int64_t n0 = static_cast<int64_t>(blockIdx.z) * kGradCols;
  const int begin = rt.offsets[client];
  const int end = rt.offsets[client + 1];
  const int tid = threadIdx.x;
  // Frozen clients, clients without rows and chunks past the rank keep their zero gradient.
  if (!rt.trainable[client] || j0 >= rank || begin >= end) {
    if (tid == 0) partial[partial_index(per_client, partial_offset)] = 0.f;
    return;
  }

  __shared__ int64_t rows[kGradRows];
  __shared__ float ps[kGradRows][kRankChunk + 1];
  __shared__ float zs[kGradRows][kGradCols];
  __shared__ float red[kGradThreadsFma];
  const int col = tid % kGradCols;   // this thread's column
  const int jr = tid / kGradCols;    // and ranks jr, jr + 4, jr + 8, jr + 12
  constexpr int kRankStep = kGradThreadsFma / kGradCols;
  constexpr int kRanksPerThread = kRankChunk / kRankStep;
  float acc[kRanksPerThread] = {};
  for (int pos0 = begin; pos0 < end; pos0 += kGradRows) {
    if (tid < kGradRows) rows[tid] = pos0 + tid < end ? static_cast<int64_t>(rt.sorted_rows[pos0 + tid]) : -1;
    __syncthreads();
    for (int e = tid; e < kGradRows * kRankChunk; e += kGradThreadsFma) {
      const int t = e / kRankChunk, j = e % kRankChunk;
      ps[t][j] = (rows[t] >= 0 && j0 + j < rank) ? p[static_cast<int64_t>(pos0 + t) * rt.r_max + j0 + j] : 0.f;
    }
    for (int e = tid; e < kGradRows * kGradCols; e += kGradThreadsFma) {
      const int t = e / kGradCols, c = e % kGradCols;
      zs[t][c] = (rows[t] >= 0 && n0 + c < n_out) ? Elem<T>::to_float(z[rows[t] * n_out + n0 + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int t = 0; t < kGradRows; ++t) {
      const float zval = zs[t][col];
#pragma unroll
      for (int i = 0; i < kRanksPerThread; ++i) acc[i] += ps[t][jr + i * kRankStep] * zval;
    }
    __syncthreads();
  }
  const float scale = apply_scale ? rt.scaling[client] : 1.f;
  const int64_t n = n0 + col;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kRanksPerThread; ++i) {
    const int j = j0 + jr + i * kRankStep;
    if (j < rank && n < n_out) {
      const float v = scale * acc[i];
      sq += v * v;
      out[client * ov.c_stride + j * ov.j_stride + n * ov.k_stride] = Elem<T>::from_float(v);
    }
  }
  const float total = block_sum<kGradThreadsFma>(sq, red);
  if (tid == 0) partial[partial_index(per_client, partial_offset)] = total;
}

// wgrad_fma_kernel on TF32 tensor cores: each of the 4 warps owns 16 of the tile's 64
// columns; A(j, t) = P[t, j] (col-major view of the staged P), B(t, n) = Z[t, n].
template <typename T>
__global__ void __launch_bounds__(kGradThreadsTc)
    wgrad_tf32_kernel(const float* __restrict__ p, const T* __restrict__ z, int64_t n_out, T* __restrict__ out,
                      MatView ov, Routing rt, bool apply_scale, float* __restrict__ partial, int64_t per_client,
                      int64_t partial_offset) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int client = blockIdx.x;
  const int rank = rt.ranks[client];
  const int j0 = blockIdx.y * kRankChunk;
  const int64_t n0 = static_cast<int64_t>(blockIdx.z) * kGradCols;
  const int begin = rt.offsets[client];
  const int end = rt.offsets[client + 1];
  const int tid = threadIdx.x;
  if (!rt.trainable[client] || j0 >= rank || begin >= end) {
    if (tid == 0) partial[partial_index(per_client, partial_offset)] = 0.f;
    return;
  }

  constexpr int kLdp = kRankChunk + 4;  // fp32 leading dimensions: multiples of 4 for WMMA
  constexpr int kLdz = kGradCols + 4;
  __shared__ int64_t rows[kGradRows];
  __shared__ __align__(32) float ps[kGradRows * kLdp];
  __shared__ __align__(32) float zs[kGradRows * kLdz];
  __shared__ __align__(32) float cs[kRankChunk * kLdz];
  __shared__ float red[kGradThreadsTc];
  const int warp = tid / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int pos0 = begin; pos0 < end; pos0 += kGradRows) {
    if (tid < kGradRows) rows[tid] = pos0 + tid < end ? static_cast<int64_t>(rt.sorted_rows[pos0 + tid]) : -1;
    __syncthreads();
    for (int e = tid; e < kGradRows * kRankChunk; e += kGradThreadsTc) {
      const int t = e / kRankChunk, j = e % kRankChunk;
      ps[t * kLdp + j] =
          (rows[t] >= 0 && j0 + j < rank) ? p[static_cast<int64_t>(pos0 + t) * rt.r_max + j0 + j] : 0.f;
    }
    for (int e = tid; e < kGradRows * kGradCols; e += kGradThreadsTc) {
      const int t = e / kGradCols, c = e % kGradCols;
      zs[t * kLdz + c] = (rows[t] >= 0 && n0 + c < n_out) ? Elem<T>::to_float(z[rows[t] * n_out + n0 + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGradRows; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
      wmma::load_matrix_sync(a, ps + kk * kLdp, kLdp);
      wmma::load_matrix_sync(b, zs + kk * kLdz + warp * 16, kLdz);
#pragma unroll
      for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
#pragma unroll
      for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
      wmma::mma_sync(acc, a, b, acc);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(cs + warp * 16, acc, kLdz, wmma::mem_row_major);
  __syncthreads();
  const float scale = apply_scale ? rt.scaling[client] : 1.f;
  float sq = 0.f;
  for (int e = tid; e < kRankChunk * kGradCols; e += kGradThreadsTc) {
    const int j = j0 + e / kGradCols;
    const int64_t n = n0 + e % kGradCols;
    if (j < rank && n < n_out) {
      const float v = scale * cs[(e / kGradCols) * kLdz + e % kGradCols];
      sq += v * v;
      out[client * ov.c_stride + j * ov.j_stride + n * ov.k_stride] = Elem<T>::from_float(v);
    }
  }
  const float total = block_sum<kGradThreadsTc>(sq, red);
  if (tid == 0) partial[partial_index(per_client, partial_offset)] = total;
#endif
}

// grad_sqnorm[c] += the client's partials, in index order, for clients the backward touched.
__global__ void sqnorm_reduce_kernel(const float* __restrict__ partial, int64_t per_client, Routing rt,
                                     float* __restrict__ grad_sqnorm) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= rt.num_clients) return;
  if (!rt.trainable[c] || rt.ranks[c] == 0 || rt.offsets[c + 1] == rt.offsets[c]) return;
  float s = 0.f;
  for (int64_t i = 0; i < per_client; ++i) s += partial[c * per_client + i];
  grad_sqnorm[c] += s;
}

// ---------------------------------------------------------------------------------------
// Launchers.

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t grad_blocks(const Routing& rt, int64_t n) { return cdiv(rt.r_max, kRankChunk) * cdiv(n, kGradCols); }

// Tensor cores for 16-bit inputs on sm_80+, where WMMA covers bf16 and TF32.
template <typename T>
bool use_tensor_cores() {
  if (std::is_same_v<T, float>) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

template <typename T>
void launch_shrink(const T* z, int64_t k_len, const T* m, MatView mv, float* p, const Routing& rt, bool apply_scale,
                   bool tensor_cores, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rt.max_tiles), static_cast<unsigned>(cdiv(rt.r_max, kRankChunk)));
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      shrink_wmma_kernel<T><<<grid, kShrinkThreads, 0, stream>>>(z, k_len, m, mv, p, rt, apply_scale);
      return;
    }
  }
  shrink_fma_kernel<T><<<grid, kShrinkThreads, 0, stream>>>(z, k_len, m, mv, p, rt, apply_scale);
}

template <typename T>
void launch_expand(const float* p, const T* m, MatView mv, const T* bias, T* out, int64_t n_out,
                   const Routing& rt, bool apply_scale, cudaStream_t stream) {
  if (n_out == 0) return;
  const dim3 grid(static_cast<unsigned>(rt.max_tiles), static_cast<unsigned>(cdiv(n_out, kExpandCols)));
  expand_kernel<T><<<grid, kExpandThreads, 0, stream>>>(p, m, mv, bias, out, n_out, rt, apply_scale);
}

template <typename T>
void launch_wgrad(const float* p, const T* z, int64_t n_out, T* out, MatView ov, const Routing& rt,
                  bool apply_scale, float* partial, int64_t per_client, int64_t partial_offset, bool tensor_cores,
                  cudaStream_t stream) {
  if (n_out == 0) return;
  const dim3 grid(static_cast<unsigned>(rt.num_clients), static_cast<unsigned>(cdiv(rt.r_max, kRankChunk)),
                  static_cast<unsigned>(cdiv(n_out, kGradCols)));
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      wgrad_tf32_kernel<T><<<grid, kGradThreadsTc, 0, stream>>>(p, z, n_out, out, ov, rt, apply_scale, partial,
                                                                 per_client, partial_offset);
      return;
    }
  }
  wgrad_fma_kernel<T><<<grid, kGradThreadsFma, 0, stream>>>(p, z, n_out, out, ov, rt, apply_scale, partial,
                                                             per_client, partial_offset);
}

// Client-matrix views. A_c[j, k] for the forward shrink and the dx expand; B_c^T[j, n] =
// B_c[n, j] for the forward expand and the G shrink.
MatView a_view(const Routing& rt) { return MatView{rt.r_max * rt.d_in, rt.d_in, 1}; }
MatView bt_view(const Routing& rt) { return MatView{rt.d_out * rt.r_max, 1, rt.r_max}; }

// With r_max == 0 there is nothing to shrink (and a grid without rank chunks), but the
// expand still writes every row of out and dx.
template <typename T>
cudaError_t forward_impl(const Routing& rt, const T* x, const T* lora_a, const T* lora_b, const T* bias, float* h,
                         T* out, cudaStream_t stream) {
  if (rt.rows == 0) return cudaSuccess;
  const bool tc = use_tensor_cores<T>();
  if (rt.r_max > 0) launch_shrink<T>(x, rt.d_in, lora_a, a_view(rt), h, rt, false, tc, stream);
  launch_expand<T>(h, lora_b, bt_view(rt), bias, out, rt.d_out, rt, true, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const Routing& rt, const T* dy, const T* x, const T* lora_a, const T* lora_b,
                          const float* h, float* g, T* dx, T* d_a, T* d_b, float* workspace, float* grad_sqnorm,
                          cudaStream_t stream) {
  if (rt.rows == 0) return cudaSuccess;
  const bool tc = use_tensor_cores<T>();
  if (rt.r_max > 0) launch_shrink<T>(dy, rt.d_out, lora_b, bt_view(rt), g, rt, true, tc, stream);
  if (dx != nullptr) launch_expand<T>(g, lora_a, a_view(rt), nullptr, dx, rt.d_in, rt, false, stream);
  if (rt.r_max > 0 && d_a != nullptr && d_b != nullptr) {
    const int64_t blocks_a = grad_blocks(rt, rt.d_in);
    const int64_t per_client = blocks_a + grad_blocks(rt, rt.d_out);
    // dA_c = G_c^T X_c (G already holds s_c); dB_c[n, j] = s_c sum_t dY[t, n] H[t, j].
    launch_wgrad<T>(g, x, rt.d_in, d_a, a_view(rt), rt, false, workspace, per_client, 0, tc, stream);
    launch_wgrad<T>(h, dy, rt.d_out, d_b, bt_view(rt), rt, true, workspace, per_client, blocks_a, tc, stream);
    if (grad_sqnorm != nullptr) {
      constexpr int kThreads = 128;
      const unsigned blocks = static_cast<unsigned>(cdiv(rt.num_clients, kThreads));
      sqnorm_reduce_kernel<<<blocks, kThreads, 0, stream>>>(workspace, per_client, rt, grad_sqnorm);
    }
  }
  return cudaGetLastError();
}

}  // namespace

int64_t backward_workspace_floats(const Routing& rt) {
  return rt.num_clients * (grad_blocks(rt, rt.d_in) + grad_blocks(rt, rt.d_out));
}

namespace {

// Calls fn(T{}) with T the element type named by dtype.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16:
      return fn(__half{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
    case DType::kFloat32:
      return fn(float{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_forward(DType dtype, const Routing& rt, const void* x, const void* lora_a, const void* lora_b,
                           const void* bias, float* h, void* out, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return forward_impl<T>(rt, static_cast<const T*>(x), static_cast<const T*>(lora_a),
                           static_cast<const T*>(lora_b), static_cast<const T*>(bias), h, static_cast<T*>(out),
                           stream);
  });
}

cudaError_t launch_backward(DType dtype, const Routing& rt, const void* dy, const void* x, const void* lora_a,
                            const void* lora_b, const float* h, float* g, void* dx, void* d_a, void* d_b,
                            float* workspace, float* grad_sqnorm, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return backward_impl<T>(rt, static_cast<const T*>(dy), static_cast<const T*>(x),
                            static_cast<const T*>(lora_a), static_cast<const T*>(lora_b), h, g,
                            static_cast<T*>(dx), static_cast<T*>(d_a), static_cast<T*>(d_b), workspace,
                            grad_sqnorm, stream);
  });
}

}  // namespace fedhello::cuda
