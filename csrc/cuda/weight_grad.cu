// Weight-gradient kernels of the CUDA backend (the backward's dA, dB and squared norms).
//
// wgrad    dW_c[j, n] = s? * sum_t P[t, j] Z[t, n] over all rows of client c: one block owns
//          one complete 16 x 64 tile of dA_c or dB_c, so it can square and sum the final
//          values and write one fp32 partial; a small kernel adds the partials of each
//          client in a fixed order (deterministic, no atomics). fp16/bf16 inputs use TF32
//          tensor cores (P is fp32, so it is rounded to TF32, never to 16 bits).

#include <mma.h>

#include <type_traits>

#include "lora_kernels.cuh"

namespace fedhello::cuda {
namespace {

using namespace nvcuda;

constexpr int kGradCols = 64;
constexpr int kGradRows = 32;     // client rows staged per step of wgrad
constexpr int kGradThreadsFma = 256;
constexpr int kGradThreadsTc = 128;

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

int64_t grad_blocks(const Routing& rt, int64_t n) { return cdiv(rt.r_max, kRankChunk) * cdiv(n, kGradCols); }

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

}  // namespace

int64_t backward_workspace_floats(const Routing& rt) {
  return rt.num_clients * (grad_blocks(rt, rt.d_in) + grad_blocks(rt, rt.d_out));
}

template <typename T>
void launch_weight_grads(const Routing& rt, const T* dy, const T* x, const float* h, const float* g, T* d_a, T* d_b,
                         float* workspace, float* grad_sqnorm, bool tensor_cores, cudaStream_t stream) {
  const int64_t blocks_a = grad_blocks(rt, rt.d_in);
  const int64_t per_client = blocks_a + grad_blocks(rt, rt.d_out);
  // dA_c = G_c^T X_c (G already holds s_c); dB_c[n, j] = s_c sum_t dY[t, n] H[t, j].
  launch_wgrad<T>(g, x, rt.d_in, d_a, a_view(rt), rt, false, workspace, per_client, 0, tensor_cores, stream);
  launch_wgrad<T>(h, dy, rt.d_out, d_b, bt_view(rt), rt, true, workspace, per_client, blocks_a, tensor_cores,
                  stream);
  if (grad_sqnorm != nullptr) {
    constexpr int kThreads = 128;
    const unsigned blocks = static_cast<unsigned>(cdiv(rt.num_clients, kThreads));
    sqnorm_reduce_kernel<<<blocks, kThreads, 0, stream>>>(workspace, per_client, rt, grad_sqnorm);
  }
}

#define FEDHELLO_INSTANTIATE(T)                                                                                  \
  template void launch_weight_grads<T>(const Routing&, const T*, const T*, const float*, const float*, T*, T*, \
                                       float*, float*, bool, cudaStream_t);
FEDHELLO_INSTANTIATE(float)
FEDHELLO_INSTANTIATE(__half)
FEDHELLO_INSTANTIATE(__nv_bfloat16)
#undef FEDHELLO_INSTANTIATE

}  // namespace fedhello::cuda
