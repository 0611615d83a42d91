// Temperature log-sum-exp gradient on the CPU (Ma et al. 2023, eq. 9):
// dJ/dl = tau1 * onehot(y) - tau2 * softmax(tau2 * l), times a per-row scale.
// A label outside [0, K) has no one-hot term (as in the CUDA and Triton kernels): labels on a device or
// traced by torch.compile cannot be checked on the host, so the kernel must not write past the row.
//
// Stable for fp16/bf16 logits of any magnitude and K in the tens of thousands: each row is converted to
// fp32, its maximum of tau2 * l is subtracted before exp, and the normaliser is summed in double.
#include <cmath>
#include <limits>
#include <vector>

#include "fast_exp.h"
#include "fastguide_cpu.h"
#include "parallel.h"
#include "simd.h"
#include "storage.h"

namespace fastguide::cpu {
namespace {

// Overwrites grad (which may hold the row's fp32 logits) with -tau2 * softmax(tau2 * l).
FASTGUIDE_TARGET_CLONES
void neg_scaled_softmax(const float* l, float* grad, int64_t k, float tau2) {
  float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < k; ++i) top = std::max(top, tau2 * l[i]);
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < k; ++i) {
    const float e = exp_f32(tau2 * l[i] - top);
    grad[i] = e;
    total += e;
  }
  const float norm = float(total);
  for (int64_t i = 0; i < k; ++i) grad[i] = -tau2 * (grad[i] / norm);
}

}  // namespace

void temperature_lse_grad(const TemperatureLseGradArgs& a) {
  for_each_chunk(a.rows, a.k, a.k, [&](int64_t, int64_t row, int64_t, int64_t) {
    std::vector<float> grad(size_t(a.k));
    const float* l = load_f32(a.dtype, a.logits, row * a.logits_stride, a.k, grad.data());
    neg_scaled_softmax(l, grad.data(), a.k, a.tau2);
    const int64_t label = a.labels[row];
    if (label >= 0 && label < a.k) grad[size_t(label)] += a.tau1;
    if (a.scale) {
      const float s = a.scale[row];
      for (float& g : grad) g *= s;
    }
    store_f32(a.dtype, a.out, row * a.out_stride, grad.data(), a.k);
  });
}

}  // namespace fastguide::cpu
