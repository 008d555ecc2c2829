// Host interface of the CUDA kernels for the LoRA part of multi_lora_linear.
//
// Plain pointers and sizes only, no torch: the .cu files compile with nothing
// but nvcc (the build test does exactly that), and multi_lora_cuda.cpp binds these
// launchers to torch tensors. All launches go to `stream` and return the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fedhello::cuda {

// Rows per (client, row-tile) work item: pass the plan's work list for this size with the
// rows without adapter included (LoRAPlan.tiles(kBlockM, include_unrouted=True)) as
// Routing::tile_client / tile_start.
constexpr int kBlockM = 64;

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One batch's routing and per-client settings, all device pointers.
struct Routing {
  int64_t rows;         // T
  int64_t d_in;
  int64_t d_out;
  int64_t num_clients;  // N
  int64_t r_max;
  const int32_t* sorted_rows;  // [T] row indices grouped by client
  const int32_t* offsets;      // [N + 1] start of each client's run in sorted_rows
  const float* scaling;        // [N]
  const int32_t* ranks;        // [N], each in [0, r_max]
  const bool* trainable;       // [N] (backward only)
  const int32_t* tile_client;  // [max_tiles] client of each work item: N for rows without adapter, -1 unused
  const int32_t* tile_start;   // [max_tiles] first position of each item in sorted_rows
  int64_t max_tiles;
};

// Floats of scratch the backward needs for its per-block squared norms.
int64_t backward_workspace_floats(const Routing& rt);

// out[row] = bias + s_c (x[row] A_c[:r_c]^T) B_c[:, :r_c]^T, written for every row (the bias
// alone on rows without adapter and rows of rank-0 clients; zeros for a null bias) without
// reading out; h [T, r_max] (fp32, by position in sorted_rows) receives x[row] A_c[:r_c]^T
// for every routed row, columns < r_c. x [T, d_in], lora_a [N, r_max, d_in], lora_b
// [N, d_out, r_max], bias [d_out] or nullptr, out [T, d_out]: `dtype`.
cudaError_t launch_forward(DType dtype, const Routing& rt, const void* x, const void* lora_a, const void* lora_b,
                           const void* bias, float* h, void* out, cudaStream_t stream);

// LoRA backward. g [T, r_max] fp32 is scratch for G = s_c dY B_c. When dx is not null,
// dx[row] = G A_c is written for every row (zeros where there is no LoRA term) without
// reading dx. When d_a/d_b are not null (zero-filled by the caller, [N, r_max, d_in] and
// [N, d_out, r_max]) they receive the complete gradients of trainable clients, and when
// grad_sqnorm is not null, grad_sqnorm[c] += ||dA_c||^2 + ||dB_c||^2 (deterministic: per-block
// partials in `workspace`, backward_workspace_floats(rt) floats, summed in a fixed order).
cudaError_t launch_backward(DType dtype, const Routing& rt, const void* dy, const void* x, const void* lora_a,
                            const void* lora_b, const float* h, float* g, void* dx, void* d_a, void* d_b,
                            float* workspace, float* grad_sqnorm, cudaStream_t stream);

}  // namespace fedhello::cuda
