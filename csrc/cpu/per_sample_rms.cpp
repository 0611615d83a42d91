// Per-sample root mean square on the CPU: sqrt(mean(x^2)) over each row, accumulated in double.
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

FASTGUIDE_TARGET_CLONES
double tile_sum_squares(const float* x, int64_t len) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) acc += double(x[i]) * double(x[i]);
  return acc;
}

}  // namespace

void per_sample_rms(const PerSampleRmsArgs& a) {
  const int64_t per_row = chunks_per_row(a.n, kChunk);
  std::vector<double> partial(size_t(a.rows * per_row), 0.0);
  for_each_chunk(a.rows, a.n, kChunk, [&](int64_t item, int64_t row, int64_t begin, int64_t len) {
    alignas(64) float buf[kTile];
    double acc = 0;
    for (int64_t t = begin; t < begin + len; t += kTile) {
      const int64_t tl = std::min(kTile, begin + len - t);
      acc += tile_sum_squares(load_f32(a.dtype, a.x, row * a.x_stride + t, tl, buf), tl);
    }
    partial[size_t(item)] = acc;
  });
  for (int64_t row = 0; row < a.rows; ++row) {
    double total = 0;
    for (int64_t j = 0; j < per_row; ++j) total += partial[size_t(row * per_row + j)];
    a.out[row] = float(std::sqrt(total / double(a.n)));  // n == 0 gives NaN, like the mean of nothing
  }
}

}  // namespace fastguide::cpu
