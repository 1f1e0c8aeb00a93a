// CUDA instance of the KD streaming statistics: one warp per row streams over a chunk of logits.
// Each lane folds its strided columns into online softmax statistics (merged across the warp with shuffles at the end)
// and proposes its column to the row's top-k, kept sorted in shared memory. A warp ballot filters the 32 columns of a
// step against the current k-th key, so after the first few hundred columns almost no step inserts anything; the rare
// insertions run the same sequential `topk_insert` as the CPU instance (kd_topk.h) on lane 0.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kd_topk.h"

namespace {

constexpr int kWarps = 4;  // rows per block
constexpr unsigned kFull = 0xffffffffu;

// Online softmax statistics of the whole warp (every lane ends with the merged value).
__device__ __forceinline__ rpp::kd::SoftmaxStats warp_merge(rpp::kd::SoftmaxStats st) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const rpp::kd::SoftmaxStats other{__shfl_xor_sync(kFull, st.m, offset), __shfl_xor_sync(kFull, st.l, offset)};
    st = rpp::kd::stats_merge(st, other);
  }
  return st;
}

template <typename scalar_t>
__global__ void kd_topk_stats_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t n, int64_t ld,
                                     int64_t col0, float inv_t, const bool* __restrict__ mask,
                                     float* __restrict__ row_lse, float* __restrict__ row_lse_1,
                                     int64_t* __restrict__ keys, int k) {
  extern __shared__ int64_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // the whole warp leaves together; only warp-level syncs follow
  int64_t* top = smem + warp * k;
  int64_t* row_keys = keys + row * k;
  for (int i = lane; i < k; i += 32) top[i] = row_keys[i];
  __syncwarp();
  int64_t thr = k > 0 ? top[k - 1] : INT64_MAX;
  const scalar_t* xr = x + row * ld;
  rpp::kd::SoftmaxStats st = rpp::kd::stats_empty(), st1 = rpp::kd::stats_empty();
  for (int64_t base = 0; base < n; base += 32) {
    const int64_t j = base + lane;
    float v = -INFINITY;
    if (j < n && (mask == nullptr || mask[col0 + j])) v = static_cast<float>(xr[j]);
    if (row_lse != nullptr) rpp::kd::stats_add(st, v * inv_t);
    if (row_lse_1 != nullptr) rpp::kd::stats_add(st1, v);
    if (k > 0) {
      const int64_t key = v == -INFINITY ? rpp::kd::kEmptyKey : rpp::kd::pack_key(v, static_cast<int32_t>(col0 + j));
      unsigned pending = __ballot_sync(kFull, key > thr);
      while (pending) {  // warp-uniform: every lane holds the same ballot
        const int src = __ffs(pending) - 1;
        const int64_t cand = __shfl_sync(kFull, key, src);
        if (lane == 0) rpp::kd::topk_insert(top, k, cand);
        __syncwarp();
        thr = top[k - 1];
        pending &= ~(1u << src);
        pending &= __ballot_sync(kFull, key > thr);  // candidates the insertion raised the bar above drop out
      }
    }
  }
  if (row_lse != nullptr) {
    st = warp_merge(st);
    if (lane == 0) row_lse[row] = rpp::kd::stats_lse(rpp::kd::stats_merge(rpp::kd::stats_from_lse(row_lse[row]), st));
  }
  if (row_lse_1 != nullptr) {
    st1 = warp_merge(st1);
    if (lane == 0) {
      row_lse_1[row] = rpp::kd::stats_lse(rpp::kd::stats_merge(rpp::kd::stats_from_lse(row_lse_1[row]), st1));
    }
  }
  __syncwarp();
  for (int i = lane; i < k; i += 32) row_keys[i] = top[i];
}

}  // namespace

void kd_topk_stats_cuda(const at::Tensor& x, int64_t col0, double inv_t, const c10::optional<at::Tensor>& mask,
                        at::Tensor& row_lse, at::Tensor& row_lse_1, at::Tensor& keys) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int k = static_cast<int>(keys.size(1));
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps));
  const size_t smem = sizeof(int64_t) * kWarps * k;
  // c10's stream header, not ATen/cuda/CUDAContext.h: that one needs cuSPARSE headers some toolkits lack.
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kd_topk_stats_cuda", [&] {
    kd_topk_stats_kernel<scalar_t><<<grid, 32 * kWarps, smem, stream>>>(
        x.data_ptr<scalar_t>(), rows, x.size(1), x.stride(0), col0, static_cast<float>(inv_t),
        mask.has_value() ? mask->data_ptr<bool>() : nullptr, row_lse.numel() ? row_lse.data_ptr<float>() : nullptr,
        row_lse_1.numel() ? row_lse_1.data_ptr<float>() : nullptr, keys.data_ptr<int64_t>(), k);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
