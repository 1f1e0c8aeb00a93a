// CPU instance of the KD streaming statistics: the same per-row code (kd_topk.h) the CUDA kernel runs, one row per
// task. Used by tests (and CPU callers) to check that logic without a GPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kd_topk.h"

void kd_topk_stats_cpu(const at::Tensor& x, int64_t col0, double inv_t, const c10::optional<at::Tensor>& mask,
                       at::Tensor& row_lse, at::Tensor& row_lse_1, at::Tensor& keys) {
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  const int k = static_cast<int>(keys.size(1));
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  float* lse_ptr = row_lse.numel() ? row_lse.data_ptr<float>() : nullptr;
  float* lse1_ptr = row_lse_1.numel() ? row_lse_1.data_ptr<float>() : nullptr;
  int64_t* keys_ptr = keys.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kd_topk_stats_cpu", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        rpp::kd::row_update<scalar_t>(x_ptr + r * ld, n, col0, static_cast<float>(inv_t), mask_ptr,
                                      lse_ptr ? lse_ptr + r : nullptr,
                                      lse1_ptr ? lse1_ptr + r : nullptr, keys_ptr + r * k, k);
      }
    });
  });
}
