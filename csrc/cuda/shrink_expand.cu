// Shrink and expand kernels of the CUDA backend: H / out in the forward, G / dx in the backward.
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

#include <mma.h>

#include <type_traits>

#include "lora_kernels.cuh"

namespace fedhello::cuda {
namespace {

using namespace nvcuda;

constexpr int kShrinkK = 32;      // reduction slice of the shrink
constexpr int kShrinkThreads = 128;
constexpr int kExpandCols = 64;
constexpr int kExpandThreads = 256;

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

}  // namespace

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

#define FEDHELLO_INSTANTIATE(T)                                                                                 \
  template void launch_shrink<T>(const T*, int64_t, const T*, MatView, float*, const Routing&, bool, bool,       \
                                 cudaStream_t);                                                                  \
  template void launch_expand<T>(const float*, const T*, MatView, const T*, T*, int64_t, const Routing&, bool,   \
                                 cudaStream_t);
FEDHELLO_INSTANTIATE(float)
FEDHELLO_INSTANTIATE(__half)
FEDHELLO_INSTANTIATE(__nv_bfloat16)
#undef FEDHELLO_INSTANTIATE

}  // namespace fedhello::cuda
