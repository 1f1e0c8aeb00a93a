// The one pybind module of rpp_kernels (`rpp_kernels._C`): argument checks with readable messages, then the CPU or
// CUDA instance. `_C.WITH_CUDA` is true only when the .cu files were compiled in (RPP_WITH_CUDA).
#include <torch/extension.h>

#include <string>
#include <utility>

#include "kd_topk.h"

void kd_topk_stats_cpu(const at::Tensor& x, int64_t col0, double inv_t, const c10::optional<at::Tensor>& mask,
                       at::Tensor& row_lse, at::Tensor& row_lse_1, at::Tensor& keys);
#ifdef RPP_WITH_CUDA
void kd_topk_stats_cuda(const at::Tensor& x, int64_t col0, double inv_t, const c10::optional<at::Tensor>& mask,
                        at::Tensor& row_lse, at::Tensor& row_lse_1, at::Tensor& keys);
#endif

// Streaming per-row statistics of one chunk of logits x [B, n] (classes col0 .. col0 + n - 1), updated in place:
// row_lse [B] (float32; log-sum-exp of x * inv_t over unmasked classes; empty to skip), row_lse_1 [B] (the same at
// inv_t = 1, in the same pass; empty to skip) and keys [B, k] (int64, the
// running top-k as packed keys sorted descending, kEmptyKey where unfilled; k = 0 to skip).
void kd_topk_stats(const at::Tensor& x, int64_t col0, double inv_t, const c10::optional<at::Tensor>& mask,
                   at::Tensor row_lse, at::Tensor row_lse_1, at::Tensor keys) {
  TORCH_CHECK(x.dim() == 2, "kd_topk_stats: x must be [B, n], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              "kd_topk_stats: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, "kd_topk_stats: x must have unit stride along classes, got strides ",
              x.strides());
  TORCH_CHECK(col0 >= 0 && col0 + x.size(1) <= INT32_MAX, "kd_topk_stats: class indices must fit in int32, got col0=",
              col0, " n=", x.size(1));
  const int64_t rows = x.size(0);
  for (const auto& [name, lse] : {std::pair<const char*, const at::Tensor*>{"row_lse", &row_lse},
                                  std::pair<const char*, const at::Tensor*>{"row_lse_1", &row_lse_1}}) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    (lse->numel() == 0 || (lse->dim() == 1 && lse->size(0) == rows)),
                "kd_topk_stats: ", name, " must be a contiguous float32 [B=", rows, "] tensor (or empty), got ",
                lse->scalar_type(), " ", lse->sizes());
  }
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 2 && keys.size(0) == rows && keys.is_contiguous(),
              "kd_topk_stats: keys must be a contiguous int64 [B=", rows, ", k] tensor, got ", keys.scalar_type(), " ",
              keys.sizes());
  TORCH_CHECK(keys.size(1) <= rpp::kd::kMaxK, "kd_topk_stats: k=", keys.size(1), " exceeds the maximum ",
              rpp::kd::kMaxK);
  for (const at::Tensor* t : {&row_lse, &row_lse_1, &keys}) {
    TORCH_CHECK(t->device() == x.device(), "kd_topk_stats: all tensors must be on ", x.device(), ", got ", t->device());
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->is_contiguous(),
                "kd_topk_stats: mask must be a contiguous bool [C] tensor, got ", mask->scalar_type(), " ",
                mask->sizes());
    TORCH_CHECK(mask->size(0) >= col0 + x.size(1), "kd_topk_stats: mask has ", mask->size(0),
                " classes but the chunk ends at class ", col0 + x.size(1));
    TORCH_CHECK(mask->device() == x.device(), "kd_topk_stats: mask is on ", mask->device(), " but x is on ",
                x.device());
  }
  if (rows == 0 || x.size(1) == 0) return;
  if (x.is_cuda()) {
#ifdef RPP_WITH_CUDA
    kd_topk_stats_cuda(x, col0, inv_t, mask, row_lse, row_lse_1, keys);
#else
    TORCH_CHECK(false, "kd_topk_stats: rpp_kernels._C was built without CUDA (no nvcc at build time)");
#endif
  } else {
    TORCH_CHECK(x.device().is_cpu(), "kd_topk_stats: unsupported device ", x.device());
    kd_topk_stats_cpu(x, col0, inv_t, mask, row_lse, row_lse_1, keys);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rpp_kernels C++/CUDA kernels";
  m.def("kd_topk_stats", &kd_topk_stats, "Streaming per-row log-sum-exp and top-k keys of a chunk of logits",
        py::arg("x"), py::arg("col0"), py::arg("inv_t"), py::arg("mask"), py::arg("row_lse"), py::arg("row_lse_1"),
        py::arg("keys"));
  m.attr("KD_MAX_K") = rpp::kd::kMaxK;
#ifdef RPP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  // What the .cu files were compiled for (setup.py's cuda_targets): "sm_80;sm_90;compute_90" = SASS + PTX.
  std::string archs;
  for (const int arch : {RPP_CUDA_SASS}) archs += "sm_" + std::to_string(arch) + ";";
  m.attr("CUDA_ARCHS") = archs + "compute_" + std::to_string(RPP_CUDA_PTX);
#else
  m.attr("WITH_CUDA") = false;
  m.attr("CUDA_ARCHS") = "";
#endif
}
