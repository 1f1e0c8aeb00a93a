// Per-row logic of the KD loss's streaming statistics, shared by the CUDA kernel (kd_topk.cu) and its CPU instance
// (kd_topk_cpu.cpp) so that CI tests the same code without a GPU:
//   * order-preserving int64 keys: (logit, class) -> one integer whose order is (logit desc, class asc), the package's
//     tie rule (equal logits: the lower class index wins); identical to the Triton backend's packing;
//   * a sorted (descending) top-k buffer with insertion;
//   * online softmax statistics (running max and sum of exp) with merging, for log-sum-exp.
// Plain C++ when compiled without nvcc: RPP_HD expands to `inline`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define RPP_HD __host__ __device__ __forceinline__
#else
#define RPP_HD inline
#endif

namespace rpp {
namespace kd {

constexpr int kMaxK = 256;                   // top-k buffer per row (CUDA: in shared memory, one per warp)
constexpr int64_t kEmptyKey = INT64_MIN;     // below every real key: an unfilled slot
constexpr int32_t kLowBits = 0x7FFFFFFF;

RPP_HD int32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_int(v);
#else
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

// Key of (v, col): larger v first; equal v, smaller col first. -0.0 and +0.0 are the same logit.
RPP_HD int64_t pack_key(float v, int32_t col) {
  if (v == 0.0f) v = 0.0f;
  const int32_t bits = float_bits(v);
  // Negative floats order backwards as integers: flipping their magnitude bits makes the int order the float order.
  const int32_t ordered = bits < 0 ? (bits ^ kLowBits) : bits;
  return static_cast<int64_t>(ordered) * (int64_t(1) << 32) + static_cast<int64_t>(kLowBits - col);
}

// Insert `key` into keys[0..k) sorted descending, dropping the smallest. Returns false if it did not enter.
RPP_HD bool topk_insert(int64_t* keys, int k, int64_t key) {
  if (k <= 0 || key <= keys[k - 1]) return false;
  int pos = k - 1;
  while (pos > 0 && keys[pos - 1] < key) {
    keys[pos] = keys[pos - 1];
    --pos;
  }
  keys[pos] = key;
  return true;
}

// Running max `m` and sum `l` of exp(x - m); -inf entries (masked classes) contribute nothing.
struct SoftmaxStats {
  float m;
  float l;
};

RPP_HD SoftmaxStats stats_empty() { return {-INFINITY, 0.0f}; }

RPP_HD void stats_add(SoftmaxStats& s, float x) {
  if (x == -INFINITY) return;
  if (x > s.m) {
    s.l = s.l * expf(s.m - x) + 1.0f;  // exp(-inf) = 0 for the first finite entry
    s.m = x;
  } else {
    s.l += expf(x - s.m);
  }
}

RPP_HD SoftmaxStats stats_merge(SoftmaxStats a, SoftmaxStats b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const float m = a.m > b.m ? a.m : b.m;
  return {m, a.l * expf(a.m - m) + b.l * expf(b.m - m)};
}

// Stats of a single log-sum-exp value (the state carried between chunks).
RPP_HD SoftmaxStats stats_from_lse(float lse) { return {lse, lse == -INFINITY ? 0.0f : 1.0f}; }

RPP_HD float stats_lse(SoftmaxStats s) { return s.l > 0.0f ? s.m + logf(s.l) : -INFINITY; }

// The whole per-row update, sequentially (the CPU instance; the CUDA kernel splits it over a warp):
// columns x[0..n) are classes col0 + j; masked classes (mask[col0 + j] == false) and -inf logits are skipped.
// Updates the row's log-sum-exp of x * inv_t (if lse != nullptr), of x itself (if lse_1 != nullptr: the student's
// temperature-1 statistics for cross-entropy, in the same pass) and its top-k keys of x (if k > 0).
template <typename scalar_t>
RPP_HD void row_update(const scalar_t* x, int64_t n, int64_t col0, float inv_t, const bool* mask, float* lse,
                       float* lse_1, int64_t* keys, int k) {
  SoftmaxStats s = stats_empty(), s1 = stats_empty();
  for (int64_t j = 0; j < n; ++j) {
    if (mask != nullptr && !mask[col0 + j]) continue;
    const float v = static_cast<float>(x[j]);
    if (v == -INFINITY) continue;
    if (lse != nullptr) stats_add(s, v * inv_t);
    if (lse_1 != nullptr) stats_add(s1, v);
    if (k > 0) topk_insert(keys, k, pack_key(v, static_cast<int32_t>(col0 + j)));
  }
  if (lse != nullptr) *lse = stats_lse(stats_merge(stats_from_lse(*lse), s));
  if (lse_1 != nullptr) *lse_1 = stats_lse(stats_merge(stats_from_lse(*lse_1), s1));
}

}  // namespace kd
}  // namespace rpp
