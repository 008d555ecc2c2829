// Torch binding of the CUDA kernels (multi_lora_kernels.cu): checks the tensors, allocates
// the outputs and launches on the current stream of the tensors' device.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>

#include "../common/lora_checks.h"
#include "multi_lora_cuda.h"

namespace fedhello::cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;  // the checks admit float32, float16 and bfloat16 only
  }
}

// The work list must be LoRAPlan.tiles(kBlockM, include_unrouted=True): a list for another tile
// size, or without the items of the rows without adapter, would leave rows of out / dx unwritten.
void check_cuda_args(const LoRASizes& s, const at::Tensor& x2d, const at::Tensor& tile_client,
                     const at::Tensor& tile_start) {
  TORCH_CHECK_VALUE(x2d.is_cuda(), "x2d: expected a CUDA tensor, got one on ", x2d.device());
  const int64_t max_tiles = (s.rows + kBlockM - 1) / kBlockM + s.num_clients + 1;
  check_tensor(tile_client, "tile_client", at::kInt, x2d.device(), {max_tiles}, "[cdiv(T, BLOCK_M) + N + 1]");
  check_tensor(tile_start, "tile_start", at::kInt, x2d.device(), {max_tiles}, "[cdiv(T, BLOCK_M) + N + 1]");
}

Routing make_routing(const LoRASizes& s, const at::Tensor& sorted_rows, const at::Tensor& offsets,
                     const at::Tensor& scaling, const at::Tensor& ranks, const bool* trainable,
                     const at::Tensor& tile_client, const at::Tensor& tile_start) {
  return Routing{s.rows,
                 s.d_in,
                 s.d_out,
                 s.num_clients,
                 s.r_max,
                 sorted_rows.data_ptr<int32_t>(),
                 offsets.data_ptr<int32_t>(),
                 scaling.data_ptr<float>(),
                 ranks.data_ptr<int32_t>(),
                 trainable,
                 tile_client.data_ptr<int32_t>(),
                 tile_start.data_ptr<int32_t>(),
                 tile_client.size(0)};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fedhello CUDA ", what, " launch failed: ", cudaGetErrorString(err));
}

at::Tensor lora_forward(const at::Tensor& x2d, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& sorted_rows, const at::Tensor& offsets, const at::Tensor& scaling,
                        const at::Tensor& ranks, const at::Tensor& tile_client, const at::Tensor& tile_start,
                        const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const LoRASizes sz = check_forward_args(x2d, lora_a, lora_b, sorted_rows, offsets, scaling, ranks, out);
  check_bias(sz, x2d, bias);
  check_cuda_args(sz, x2d, tile_client, tile_start);
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::cuda::CUDAGuard guard(x2d.device());
  at::Tensor h = at::empty({sz.rows, sz.r_max}, x2d.options().dtype(at::kFloat));
  const Routing rt = make_routing(sz, sorted_rows, offsets, scaling, ranks, nullptr, tile_client, tile_start);
  check_launch(launch_forward(to_dtype(x2d.scalar_type()), rt, x2d.data_ptr(), lora_a.data_ptr(),
                              lora_b.data_ptr(), has_bias ? bias->data_ptr() : nullptr, h.data_ptr<float>(),
                              out.data_ptr(),
                              c10::cuda::getCurrentCUDAStream().stream()),
               "forward");
  return h;
}

std::tuple<at::Tensor, at::Tensor> lora_backward(const at::Tensor& dy2d, const at::Tensor& x2d,
                                                 const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                 const at::Tensor& sorted_rows, const at::Tensor& offsets,
                                                 const at::Tensor& scaling, const at::Tensor& ranks,
                                                 const at::Tensor& trainable, const at::Tensor& tile_client,
                                                 const at::Tensor& tile_start, const at::Tensor& saved,
                                                 std::optional<at::Tensor> dx, bool weight_grads,
                                                 std::optional<at::Tensor> grad_sqnorm) {
  const LoRASizes sz =
      check_forward_args(x2d, lora_a, lora_b, sorted_rows, offsets, scaling, ranks, dy2d, "dy2d");
  check_backward_args(sz, x2d, trainable, saved, dx, grad_sqnorm);
  check_cuda_args(sz, x2d, tile_client, tile_start);
  const bool has_dx = dx.has_value() && dx->defined();
  at::Tensor d_a, d_b;
  if (!has_dx && !weight_grads) return {d_a, d_b};
  const c10::cuda::CUDAGuard guard(x2d.device());
  const auto f32 = x2d.options().dtype(at::kFloat);
  const Routing rt = make_routing(sz, sorted_rows, offsets, scaling, ranks, trainable.data_ptr<bool>(),
                                  tile_client, tile_start);
  at::Tensor g = at::empty({sz.rows, sz.r_max}, f32);
  at::Tensor workspace;
  if (weight_grads) {
    d_a = at::zeros_like(lora_a);
    d_b = at::zeros_like(lora_b);
    workspace = at::empty({backward_workspace_floats(rt)}, f32);
  }
  const bool has_sq = grad_sqnorm.has_value() && grad_sqnorm->defined();
  check_launch(launch_backward(to_dtype(x2d.scalar_type()), rt, dy2d.data_ptr(), x2d.data_ptr(), lora_a.data_ptr(),
                               lora_b.data_ptr(), saved.data_ptr<float>(), g.data_ptr<float>(),
                               has_dx ? dx->data_ptr() : nullptr, weight_grads ? d_a.data_ptr() : nullptr,
                               weight_grads ? d_b.data_ptr() : nullptr,
                               weight_grads ? workspace.data_ptr<float>() : nullptr,
                               has_sq ? grad_sqnorm->data_ptr<float>() : nullptr,
                               c10::cuda::getCurrentCUDAStream().stream()),
               "backward");
  return {d_a, d_b};
}

}  // namespace
}  // namespace fedhello::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fedhello CUDA kernels for the LoRA part of multi_lora_linear (see fedhello/kernels/extension.py)";
  m.attr("BLOCK_M") = fedhello::cuda::kBlockM;
  m.def("lora_forward", &fedhello::cuda::lora_forward, py::arg("x2d"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("sorted_rows"), py::arg("offsets"), py::arg("scaling"), py::arg("ranks"), py::arg("tile_client"),
        py::arg("tile_start"), py::arg("bias"), py::arg("out"),
        "Writes out[row] = bias + s_c (x[row] A_c[:r_c]^T) B_c[:, :r_c]^T for every row (bias, or zeros when "
        "bias is None, on rows without adapter); out is never read. Returns H, fp32 [T, r_max] by plan position.");
  m.def("lora_backward", &fedhello::cuda::lora_backward, py::arg("dy2d"), py::arg("x2d"), py::arg("lora_a"),
        py::arg("lora_b"), py::arg("sorted_rows"), py::arg("offsets"), py::arg("scaling"), py::arg("ranks"),
        py::arg("trainable"), py::arg("tile_client"), py::arg("tile_start"), py::arg("saved"), py::arg("dx"),
        py::arg("weight_grads"), py::arg("grad_sqnorm"),
        "Writes dx[row] = G A_c for every row, zeros on rows without adapter (when dx is given; never read); "
        "returns (dA, dB), None unless weight_grads; "
        "grad_sqnorm[c] += ||dA_c||^2 + ||dB_c||^2 for trainable clients.");
}
