// CPU backend of multi_lora_linear: the LoRA part of the forward and backward passes for
// N clients in one call (docs/design.md, section 1), parallel over (client, row-tile) and
// (client, column-block) work items with OpenMP, fp32 accumulation and an fp32 rank
// intermediate whatever the input dtype (float32, float16, bfloat16).
//
// This file holds the entry points: argument checks, the fp32 packing of the adapters and the
// Python binding. The forward and phase 1 of the backward (H, out; G, dx) are one
// shrink-expand pass (shrink_expand.cpp); phase 2 of the backward, the weight gradients and
// their squared norms, is its own pass (weight_grad.cpp); lora_cpu.h holds what they share.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/lora_checks.h"
#include "lora_cpu.h"

namespace fedhello::cpu {
namespace {

// Adapters of the active clients in fp32 and in the layouts the micro-kernels stream:
// a32[c][j][k] = A_c[j, k] and bt32[c][j][n] = B_c[n, j], for j < r_c.
struct PackedAdapters {
  const float* a32;
  const float* bt32;
  at::Tensor a_storage;  // empty when lora_a is float32 and a32 points into it
  at::Tensor bt_storage;
};

template <typename T>
PackedAdapters pack_adapters(const Routing& rt, const at::Tensor& lora_a, const at::Tensor& lora_b) {
  PackedAdapters pk;
  const auto f32 = lora_a.options().dtype(at::kFloat);
  if constexpr (std::is_same_v<T, float>) {
    pk.a32 = lora_a.data_ptr<float>();
  } else {
    pk.a_storage = at::empty({rt.num_clients, rt.r_max, rt.d_in}, f32);
    pk.a32 = pk.a_storage.data_ptr<float>();
  }
  pk.bt_storage = at::empty({rt.num_clients, rt.r_max, rt.d_out}, f32);
  pk.bt32 = pk.bt_storage.data_ptr<float>();
  const T* a = lora_a.data_ptr<T>();
  const T* b = lora_b.data_ptr<T>();
  float* bt32 = pk.bt_storage.data_ptr<float>();
  for (int64_t c = 0; c < rt.num_clients; ++c) {
    if (!rt.active(c)) continue;
    const int64_t rank = rt.ranks[c];
    if constexpr (!std::is_same_v<T, float>) {
      to_float(a + c * rt.r_max * rt.d_in, rank * rt.d_in, pk.a_storage.data_ptr<float>() + c * rt.r_max * rt.d_in);
    }
    const T* bc = b + c * rt.d_out * rt.r_max;
    float* btc = bt32 + c * rt.r_max * rt.d_out;
    for (int64_t n = 0; n < rt.d_out; ++n) {
      for (int64_t j = 0; j < rank; ++j) btc[j * rt.d_out + n] = static_cast<float>(bc[n * rt.r_max + j]);
    }
  }
  return pk;
}

Routing make_routing(const LoRASizes& sz, const at::Tensor& sorted_rows, const at::Tensor& offsets,
                     const at::Tensor& scaling, const at::Tensor& ranks, const bool* trainable) {
  return Routing{sz.rows, sz.d_in, sz.d_out, sz.num_clients, sz.r_max, sorted_rows.data_ptr<int32_t>(),
                 offsets.data_ptr<int32_t>(), scaling.data_ptr<float>(), ranks.data_ptr<int32_t>(), trainable};
}

// The plan and ranks come from Python objects that a caller could build by hand; check
// the values the kernels use as addresses (O(T + N)) before any thread starts. The
// expansions write each row once, at its position in sorted_rows, so sorted_rows must be
// a permutation of [0, T) for every output row to be written.
void check_routing_values(const Routing& rt) {
  TORCH_CHECK_VALUE(rt.offsets[0] >= 0 && rt.offsets[rt.num_clients] == rt.rows,
                    "plan: expected offsets[0] >= 0 and offsets[N] = T = ", rt.rows, ", got offsets[0] = ",
                    rt.offsets[0], " and offsets[N] = ", rt.offsets[rt.num_clients]);
  for (int64_t c = 0; c < rt.num_clients; ++c) {
    TORCH_CHECK_VALUE(rt.offsets[c] <= rt.offsets[c + 1], "plan: expected non-decreasing offsets, got offsets[",
                      c, "] = ", rt.offsets[c], " > offsets[", c + 1, "] = ", rt.offsets[c + 1]);
    TORCH_CHECK_VALUE(rt.ranks[c] >= 0 && rt.ranks[c] <= rt.r_max, "ranks: expected values in [0, r_max=",
                      rt.r_max, "], got ", rt.ranks[c], " for client ", c);
  }
  std::vector<bool> seen(rt.rows, false);
  for (int64_t p = 0; p < rt.rows; ++p) {
    const int32_t row = rt.sorted_rows[p];
    TORCH_CHECK_VALUE(row >= 0 && row < rt.rows, "plan: expected sorted_rows in [0, T = ", rt.rows, "), got ", row,
                      " at position ", p);
    TORCH_CHECK_VALUE(!seen[row], "plan: expected sorted_rows to be a permutation of [0, T), got row ", row,
                      " twice (at position ", p, ")");
    seen[row] = true;
  }
}

// Calls f(T{}) with T the C++ type of dt (float, c10::Half or c10::BFloat16; checked before).
template <typename F>
void dispatch_dtype(at::ScalarType dt, const F& f) {
  switch (dt) {
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;
  }
}

void check_cpu(const at::Tensor& x2d) {
  TORCH_CHECK_VALUE(x2d.device().is_cpu(), "x2d: expected a CPU tensor, got one on ", x2d.device());
}

// ---------------------------------------------------------------------------------------
// Entry points.

at::Tensor lora_forward(const at::Tensor& x2d, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& sorted_rows, const at::Tensor& offsets, const at::Tensor& scaling,
                        const at::Tensor& ranks, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  check_cpu(x2d);
  const LoRASizes sz = check_forward_args(x2d, lora_a, lora_b, sorted_rows, offsets, scaling, ranks, out);
  check_bias(sz, x2d, bias);
  const Routing rt = make_routing(sz, sorted_rows, offsets, scaling, ranks, nullptr);
  check_routing_values(rt);
  at::Tensor h = at::empty({sz.rows, sz.r_max}, x2d.options().dtype(at::kFloat));
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias32 = has_bias ? bias->to(at::kFloat) : at::Tensor();  // no copy for float32
  dispatch_dtype(x2d.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const PackedAdapters pk = pack_adapters<scalar_t>(rt, lora_a, lora_b);
    const ShrinkExpand<scalar_t> op{&rt,     x2d.data_ptr<scalar_t>(), sz.d_in, pk.a32, false, h.data_ptr<float>(),
                                    pk.bt32, sz.d_out,                 true,
                                    has_bias ? bias32.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>()};
    run_shrink_expand(op);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> lora_backward(const at::Tensor& dy2d, const at::Tensor& x2d,
                                                 const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                 const at::Tensor& sorted_rows, const at::Tensor& offsets,
                                                 const at::Tensor& scaling, const at::Tensor& ranks,
                                                 const at::Tensor& trainable, const at::Tensor& saved,
                                                 std::optional<at::Tensor> dx, bool weight_grads,
                                                 std::optional<at::Tensor> grad_sqnorm) {
  check_cpu(x2d);
  const LoRASizes sz =
      check_forward_args(x2d, lora_a, lora_b, sorted_rows, offsets, scaling, ranks, dy2d, "dy2d");
  check_backward_args(sz, x2d, trainable, saved, dx, grad_sqnorm);
  const Routing rt = make_routing(sz, sorted_rows, offsets, scaling, ranks, trainable.data_ptr<bool>());
  check_routing_values(rt);
  const bool has_dx = dx.has_value() && dx->defined();
  at::Tensor d_a, d_b;
  if (!has_dx && !weight_grads) return {d_a, d_b};
  if (weight_grads) {
    d_a = at::zeros_like(lora_a);
    d_b = at::zeros_like(lora_b);
  }
  dispatch_dtype(x2d.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const PackedAdapters pk = pack_adapters<scalar_t>(rt, lora_a, lora_b);
    at::Tensor g = at::empty({sz.rows, sz.r_max}, x2d.options().dtype(at::kFloat));
    const ShrinkExpand<scalar_t> op{&rt,     dy2d.data_ptr<scalar_t>(), sz.d_out, pk.bt32, true, g.data_ptr<float>(),
                                    pk.a32,  sz.d_in,                   false,    nullptr,
                                    has_dx ? dx->data_ptr<scalar_t>() : nullptr};
    run_shrink_expand(op);
    if (!weight_grads) return;
    run_weight_grads(rt, x2d.data_ptr<scalar_t>(), dy2d.data_ptr<scalar_t>(), g.data_ptr<float>(),
                     saved.data_ptr<float>(), d_a.data_ptr<scalar_t>(), d_b.data_ptr<scalar_t>(),
                     grad_sqnorm.has_value() && grad_sqnorm->defined() ? grad_sqnorm->data_ptr<float>() : nullptr);
  });
  return {d_a, d_b};
}

std::string get_simd_level() { return simd_name(active_simd()); }

void set_simd_level(const std::string& name) {
  const SimdLevel best = best_supported_simd();
  SimdLevel want;
  if (name == "avx512") {
    want = SimdLevel::kAvx512;
  } else if (name == "avx2") {
    want = SimdLevel::kAvx2;
  } else if (name == "baseline") {
    want = SimdLevel::kBaseline;
  } else {
    TORCH_CHECK_VALUE(false, "name: expected 'avx512', 'avx2' or 'baseline', got '", name, "'");
  }
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "name: '", name,
                    "' is not supported by this CPU (best: '", simd_name(best), "')");
  active_simd() = want;
}

}  // namespace
}  // namespace fedhello::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fedhello CPU kernels for the LoRA part of multi_lora_linear (see fedhello/kernels/extension.py)";
  m.def("lora_forward", &fedhello::cpu::lora_forward, py::arg("x2d"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("sorted_rows"), py::arg("offsets"), py::arg("scaling"), py::arg("ranks"), py::arg("bias"),
        py::arg("out"), py::call_guard<py::gil_scoped_release>(),
        "Writes out[row] = bias + s_c (x[row] A_c[:r_c]^T) B_c[:, :r_c]^T for every row (bias, or zeros when "
        "bias is None, on rows without adapter); out is never read. Returns H, fp32 [T, r_max] by plan position.");
  m.def("lora_backward", &fedhello::cpu::lora_backward, py::arg("dy2d"), py::arg("x2d"), py::arg("lora_a"),
        py::arg("lora_b"), py::arg("sorted_rows"), py::arg("offsets"), py::arg("scaling"), py::arg("ranks"),
        py::arg("trainable"), py::arg("saved"), py::arg("dx"), py::arg("weight_grads"), py::arg("grad_sqnorm"),
        py::call_guard<py::gil_scoped_release>(),
        "Writes dx[row] = G A_c for every row, zeros on rows without adapter (when dx is given; never read); "
        "returns (dA, dB), undefined (None) unless weight_grads; "
        "grad_sqnorm[c] += ||dA_c||^2 + ||dB_c||^2 for trainable clients.");
  m.def("simd_level", &fedhello::cpu::get_simd_level, "Instruction set the kernels run with: avx512, avx2 or baseline.");
  m.def("set_simd_level", &fedhello::cpu::set_simd_level, py::arg("name"),
        "Use a narrower instruction set than the best one this CPU supports (for tests and benchmarks).");
}
