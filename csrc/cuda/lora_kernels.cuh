// What the CUDA kernel files share: element conversions, client-matrix views and the
// launchers each file defines for multi_lora_kernels.cu (shrink and expand in
// shrink_expand.cu, the weight gradients in weight_grad.cu), for T = float, __half and
// __nv_bfloat16. nvcc only: the torch binding includes multi_lora_cuda.h, never this file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "multi_lora_cuda.h"

namespace fedhello::cuda {

constexpr int kRankChunk = 16;    // ranks per shrink / wgrad block

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

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Client-matrix views. A_c[j, k] for the forward shrink and the dx expand; B_c^T[j, n] =
// B_c[n, j] for the forward expand and the G shrink.
inline MatView a_view(const Routing& rt) { return MatView{rt.r_max * rt.d_in, rt.d_in, 1}; }
inline MatView bt_view(const Routing& rt) { return MatView{rt.d_out * rt.r_max, 1, rt.r_max}; }

// P[pos, :r_c] = (apply_scale ? s_c : 1) Z[row] M_c[:r_c]^T for every routed row (shrink_expand.cu).
template <typename T>
void launch_shrink(const T* z, int64_t k_len, const T* m, MatView mv, float* p, const Routing& rt, bool apply_scale,
                   bool tensor_cores, cudaStream_t stream);

// out[row] = bias + (apply_scale ? s_c : 1) P[pos, :r_c] M_c[:r_c], written for every row
// (shrink_expand.cu).
template <typename T>
void launch_expand(const float* p, const T* m, MatView mv, const T* bias, T* out, int64_t n_out,
                   const Routing& rt, bool apply_scale, cudaStream_t stream);

// d_a, d_b (zero-filled) receive the complete gradients of the trainable clients from G = g
// (holding s_c) and H = h, and grad_sqnorm (when not null) their squared norms, through
// backward_workspace_floats(rt) floats of workspace; needs rt.r_max > 0 (weight_grad.cu).
template <typename T>
void launch_weight_grads(const Routing& rt, const T* dy, const T* x, const float* h, const float* g, T* d_a, T* d_b,
                         float* workspace, float* grad_sqnorm, bool tensor_cores, cudaStream_t stream);

}  // namespace fedhello::cuda
