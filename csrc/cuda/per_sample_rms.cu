// Per-sample root mean square sqrt(mean(x^2)) over all but the batch dimension (Ma et al.'s EDM recipe).
//
// Squares of each batch of loaded elements are summed in fp32, then accumulated in fp64 per thread and
// combined in fp64 across the block and the cluster, so the error stays at fp32 rounding level however
// long the row is.
#include "dtype_io.cuh"
#include "fastguide_cuda.h"
#include "reduce.cuh"

namespace fastguide::cuda {
namespace {

using namespace detail;

struct SumSquares {
  double sum;
};

struct MergeSums {
  static __device__ __forceinline__ SumSquares identity() { return {0.0}; }
  __device__ __forceinline__ SumSquares operator()(const SumSquares& a, const SumSquares& b) const {
    return {a.sum + b.sum};
  }
};

template <class IO>
struct PerSampleRmsParams {
  using Bits = typename IO::Bits;
  int64_t rows, n;
  const Bits* x;
  int64_t x_stride;
  float* out;
};

constexpr int kRmsItems = 4;

template <class IO, int VEC>
__global__ void __launch_bounds__(kReduceThreads) per_sample_rms_kernel(const PerSampleRmsParams<IO> p) {
  using Bits = typename IO::Bits;
  using P = Pack<IO, VEC>;
  const MergeSums merge;
  const int64_t nvec = p.n / VEC;
  const int64_t stride = int64_t(gridDim.x) * kReduceThreads;
  const int64_t first = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;

  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const Bits* row = p.x + r * p.x_stride;
    SumSquares acc = MergeSums::identity();
    for (int64_t k0 = first; k0 < nvec; k0 += kRmsItems * stride) {
      P packs[kRmsItems];
#pragma unroll
      for (int i = 0; i < kRmsItems; ++i) {
        const int64_t k = k0 + i * stride;
        if (k < nvec) packs[i] = load_pack<IO, VEC>(row + k * VEC);
      }
      float partial = 0.f;
#pragma unroll
      for (int i = 0; i < kRmsItems; ++i) {
        if (k0 + i * stride >= nvec) break;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float v = pack_get(packs[i], j);
          partial += v * v;
        }
      }
      acc.sum += double(partial);
    }

    acc = block_reduce(acc, merge);
    if (gridDim.x > 1) acc = cluster_reduce(acc, merge);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      // n == 0 gives 0/0 = NaN, as the mean of an empty tensor does in torch.
      p.out[r] = float(sqrt(acc.sum / double(p.n)));
    }
  }
}

template <class IO, int VEC>
void launch_per_sample_rms(const PerSampleRmsParams<IO>& p, cudaStream_t stream) {
  const DeviceInfo info = current_device_info("per_sample_rms");
  const int blocks = blocks_per_row(p.rows, p.n, 16384, info);
  launch_row_reduction(&per_sample_rms_kernel<IO, VEC>, blocks, p.rows, stream, "per_sample_rms", p);
}

}  // namespace

void per_sample_rms(const PerSampleRmsArgs& args, void* stream) {
  if (args.rows <= 0) return;
  dispatch_dtype(args.dtype, "per_sample_rms", [&](auto io) {
    using IO = decltype(io);
    using Bits = typename IO::Bits;
    PerSampleRmsParams<IO> p;
    p.rows = args.rows;
    p.n = args.n;
    p.x = static_cast<const Bits*>(args.x);
    p.x_stride = args.x_stride;
    p.out = args.out;
    constexpr int kVec = kVec16<IO>;
    if (args.n % kVec == 0 && rows_aligned16(args.x, args.x_stride, sizeof(Bits))) {
      launch_per_sample_rms<IO, kVec>(p, as_stream(stream));
    } else {
      launch_per_sample_rms<IO, 1>(p, as_stream(stream));
    }
  });
}

}  // namespace fastguide::cuda
