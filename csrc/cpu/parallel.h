// Splitting [rows, n] work into (row, chunk) items spread over OpenMP threads.
//
// Items are numbered row-major and handed out in contiguous blocks (static schedule), so each thread
// streams through contiguous memory, and a single large row is still shared by all threads.
#pragma once
#include <algorithm>
#include <cstdint>

namespace fastguide::cpu {

// Below this many elements in total (1 MiB of fp32 per tensor) a call runs on the calling thread: waking
// the team costs a few microseconds on an idle machine and can cost milliseconds when the cores are shared
// (OpenMP workers that were descheduled), while the whole job takes only tens of microseconds.
constexpr int64_t kParallelMinElements = int64_t(1) << 18;

inline int64_t chunks_per_row(int64_t n, int64_t chunk) { return n > 0 ? (n + chunk - 1) / chunk : 1; }

// Calls fn(item, row, begin, length) for every chunk of at most `chunk` elements of every row.
template <class Fn>
void for_each_chunk(int64_t rows, int64_t n, int64_t chunk, Fn&& fn) {
  const int64_t per_row = chunks_per_row(n, chunk);
  const int64_t items = rows * per_row;
  const bool parallel = rows * n >= kParallelMinElements;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t row = item / per_row;
    const int64_t begin = (item % per_row) * chunk;
    fn(item, row, begin, std::min(chunk, n - begin));
  }
}

}  // namespace fastguide::cpu
