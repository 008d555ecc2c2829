// Argument checks shared by the CPU and CUDA bindings of the multi-client LoRA ops.
//
// The Python layer (fedhello/kernels/checks.py) validates user input first; these checks
// guard the native entry points themselves, so a direct call with a wrong shape, dtype,
// device or layout raises ValueError/TypeError instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace fedhello {

// Sizes of one multi-LoRA problem: T rows, N clients, adapters of rank <= r_max.
struct LoRASizes {
  int64_t rows;
  int64_t d_in;
  int64_t d_out;
  int64_t num_clients;
  int64_t r_max;
};

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

inline bool is_lora_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device,
                         std::initializer_list<int64_t> shape, const char* shape_name) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected a tensor on ", device, ", got ", t.device());
  bool same = t.dim() == static_cast<int64_t>(shape.size());
  int64_t i = 0;
  for (int64_t s : shape) same = same && t.size(i++) == s;
  if (!same) {
    std::string want = "(";
    i = 0;
    for (int64_t s : shape) want += (i++ ? ", " : "") + std::to_string(s);
    want += shape.size() == 1 ? ",)" : ")";
    TORCH_CHECK_VALUE(false, name, ": expected shape ", shape_name, " = ", want, ", got ", shape_str(t));
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// Checks everything the forward kernels read or write (the backward passes dy2d as `out`);
// returns the problem sizes.
inline LoRASizes check_forward_args(const at::Tensor& x2d, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                    const at::Tensor& sorted_rows, const at::Tensor& offsets,
                                    const at::Tensor& scaling, const at::Tensor& ranks, const at::Tensor& out,
                                    const char* out_name = "out") {
  TORCH_CHECK_VALUE(x2d.defined() && x2d.dim() == 2, "x2d: expected a 2-D tensor [T, d_in], got ",
                    x2d.defined() ? shape_str(x2d) : std::string("None"));
  TORCH_CHECK_TYPE(is_lora_dtype(x2d.scalar_type()), "x2d: expected dtype float32, float16 or bfloat16, got ",
                   x2d.scalar_type());
  TORCH_CHECK_VALUE(lora_a.defined() && lora_a.dim() == 3, "lora_a: expected a 3-D tensor [N, r_max, d_in], got ",
                    lora_a.defined() ? shape_str(lora_a) : std::string("None"));
  TORCH_CHECK_VALUE(lora_b.defined() && lora_b.dim() == 3, "lora_b: expected a 3-D tensor [N, d_out, r_max], got ",
                    lora_b.defined() ? shape_str(lora_b) : std::string("None"));
  const LoRASizes s{x2d.size(0), x2d.size(1), lora_b.size(1), lora_a.size(0), lora_a.size(1)};
  const auto dt = x2d.scalar_type();
  const auto dev = x2d.device();
  check_tensor(x2d, "x2d", dt, dev, {s.rows, s.d_in}, "[T, d_in]");
  check_tensor(lora_a, "lora_a", dt, dev, {s.num_clients, s.r_max, s.d_in}, "[N, r_max, d_in]");
  check_tensor(lora_b, "lora_b", dt, dev, {s.num_clients, s.d_out, s.r_max}, "[N, d_out, r_max]");
  check_tensor(out, out_name, dt, dev, {s.rows, s.d_out}, "[T, d_out]");
  check_tensor(sorted_rows, "sorted_rows", at::kInt, dev, {s.rows}, "[T]");
  check_tensor(offsets, "offsets", at::kInt, dev, {s.num_clients + 1}, "[N + 1]");
  check_tensor(scaling, "scaling", at::kFloat, dev, {s.num_clients}, "[N]");
  check_tensor(ranks, "ranks", at::kInt, dev, {s.num_clients}, "[N]");
  return s;
}

// The forward's optional bias: [d_out] in the dtype of x2d (the kernels add it in fp32).
inline void check_bias(const LoRASizes& s, const at::Tensor& x2d, const std::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", x2d.scalar_type(), x2d.device(), {s.d_out}, "[d_out]");
  }
}

// Checks the backward's extra arguments against the sizes of the forward problem.
inline void check_backward_args(const LoRASizes& s, const at::Tensor& x2d, const at::Tensor& trainable,
                                const at::Tensor& h, const std::optional<at::Tensor>& dx,
                                const std::optional<at::Tensor>& grad_sqnorm) {
  const auto dev = x2d.device();
  check_tensor(trainable, "trainable", at::kBool, dev, {s.num_clients}, "[N]");
  check_tensor(h, "saved", at::kFloat, dev, {s.rows, s.r_max}, "[T, r_max]");
  if (dx.has_value() && dx->defined()) {
    check_tensor(*dx, "dx", x2d.scalar_type(), dev, {s.rows, s.d_in}, "[T, d_in]");
  }
  if (grad_sqnorm.has_value() && grad_sqnorm->defined()) {
    check_tensor(*grad_sqnorm, "grad_sqnorm", at::kFloat, dev, {s.num_clients}, "[N]");
  }
}

}  // namespace fedhello
