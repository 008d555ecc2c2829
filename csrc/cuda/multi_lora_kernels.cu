// CUDA kernels for the LoRA part of multi_lora_linear (docs/design.md, section 1): the host
// entry points of multi_lora_cuda.h, which run the shrink and expand kernels
// (shrink_expand.cu) and the weight-gradient kernels (weight_grad.cu).
//
// Launch grids depend only on the shapes and on the plan's fixed-size work list, never on
// the routing values, so every launch can be captured in a CUDA graph; items past the end
// of the list (client -1) and rank chunks past a client's rank exit at once. The list has
// items for the rows without adapter too (client N): only the expand uses them.
//
// The tensor-core paths need sm_80 or newer; the launchers pick the FMA kernels elsewhere.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "lora_kernels.cuh"
#include "multi_lora_cuda.h"

namespace fedhello::cuda {
namespace {

// Tensor cores for 16-bit inputs on sm_80+, where WMMA covers bf16 and TF32.
template <typename T>
bool use_tensor_cores() {
  if (std::is_same_v<T, float>) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

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
    launch_weight_grads<T>(rt, dy, x, h, g, d_a, d_b, workspace, grad_sqnorm, tc, stream);
  }
  return cudaGetLastError();
}

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
