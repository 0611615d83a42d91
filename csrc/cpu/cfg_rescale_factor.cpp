// CFG-rescale factor (Lin et al. 2023, diffusers' rescale_noise_cfg) on the CPU:
// r_b = phi * std(cond_b) / std(guided_b) + (1 - phi), unbiased std, guided = u + w_b (c - u).
//
// One pass over the data: each (row, chunk) item accumulates sums and sums of squares in double (exact
// products of fp32 values, so sum of squares minus squared sum loses nothing that matters unless the mean
// exceeds the spread by ~1e6); the partials of a row are then added up and turned into the factor.
#include <cmath>
#include <vector>

#include "fastguide_cpu.h"
#include "parallel.h"
#include "simd.h"
#include "storage.h"

namespace fastguide::cpu {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int64_t kTile = 1024;

struct Moments {
  double sum_cond = 0, sq_cond = 0, sum_guided = 0, sq_guided = 0;
};

FASTGUIDE_TARGET_CLONES
void tile_moments(const float* u, const float* c, float w, int64_t len, Moments& acc) {
  double sc = 0, scc = 0, sg = 0, sgg = 0;
#pragma omp simd reduction(+ : sc, scc, sg, sgg)
  for (int64_t i = 0; i < len; ++i) {
    const double cond = c[i];
    const double guided = u[i] + w * (c[i] - u[i]);  // combined in fp32, as the reference does
    sc += cond;
    scc += cond * cond;
    sg += guided;
    sgg += guided * guided;
  }
  acc.sum_cond += sc;
  acc.sq_cond += scc;
  acc.sum_guided += sg;
  acc.sq_guided += sgg;
}

double unbiased_variance(double sum, double sq, int64_t n) {
  return (sq - sum * sum / double(n)) / double(n - 1);
}

}  // namespace

void cfg_rescale_factor(const CfgRescaleFactorArgs& a) {
  const int64_t per_row = chunks_per_row(a.n, kChunk);
  std::vector<Moments> partial(size_t(a.batch * per_row));
  for_each_chunk(a.batch, a.n, kChunk, [&](int64_t item, int64_t row, int64_t begin, int64_t len) {
    const float w = a.scale[row * a.scale_stride];
    const int64_t cond_row = row + a.batch;
    alignas(64) float ubuf[kTile];
    alignas(64) float cbuf[kTile];
    Moments acc;
    for (int64_t t = begin; t < begin + len; t += kTile) {
      const int64_t tl = std::min(kTile, begin + len - t);
      const float* u = load_f32(a.dtype, a.model_output, row * a.model_output_stride + t, tl, ubuf);
      const float* c = load_f32(a.dtype, a.model_output, cond_row * a.model_output_stride + t, tl, cbuf);
      tile_moments(u, c, w, tl, acc);
    }
    partial[size_t(item)] = acc;
  });
  for (int64_t row = 0; row < a.batch; ++row) {
    Moments total;
    for (int64_t j = 0; j < per_row; ++j) {
      const Moments& p = partial[size_t(row * per_row + j)];
      total.sum_cond += p.sum_cond;
      total.sq_cond += p.sq_cond;
      total.sum_guided += p.sum_guided;
      total.sq_guided += p.sq_guided;
    }
    const double ratio = std::sqrt(unbiased_variance(total.sum_cond, total.sq_cond, a.n) /
                                   unbiased_variance(total.sum_guided, total.sq_guided, a.n));
    a.factor[row] = float(double(a.phi) * ratio + (1.0 - double(a.phi)));
  }
}

}  // namespace fastguide::cpu
