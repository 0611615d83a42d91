// Per-sample inner products and sums of the cond c and uncond u predictions and of a third prediction e
// (GuidanceGramArgs): c.c, c.u, u.u, c.e, u.e, e.e, sum c, sum u, sum e over the first n elements of each row,
// the numbers every guidance method of fastguide.guidance.modern is computed from. With a momentum, e is first
// updated in place to (c - u) + beta e (APG's running average) in the same pass: each element is stored in the
// storage dtype and the stored (rounded) value is what is reduced, as the reference reduces the tensor it wrote.
//
// One pass over u, c (and e): each thread sums the products of every batch of loaded elements in fp32 and
// accumulates those partial sums in fp64; threads, the block and the blocks of a cluster (sm_90; one block
// per row otherwise) combine in fp64 (reduce.cuh), so long rows stay at fp32 rounding level.
#include "dtype_io.cuh"
#include "fastguide_cuda.h"
#include "reduce.cuh"

namespace fastguide::cuda {
namespace {

using namespace detail;

constexpr int kGramColumns = 9;  // the order of fastguide.backends.reference.GRAM_COLUMNS
enum GramColumn : int { kCC = 0, kCU, kUU, kCE, kUE, kEE, kSumC, kSumU, kSumE };

struct GramSums {
  double s[kGramColumns];
};

struct MergeGram {
  static __device__ __forceinline__ GramSums identity() {
    GramSums r;
#pragma unroll
    for (int k = 0; k < kGramColumns; ++k) r.s[k] = 0.0;
    return r;
  }
  __device__ __forceinline__ GramSums operator()(const GramSums& a, const GramSums& b) const {
    GramSums r;
#pragma unroll
    for (int k = 0; k < kGramColumns; ++k) r.s[k] = a.s[k] + b.s[k];
    return r;
  }
};

template <class IO>
struct GuidanceGramParams {
  using Bits = typename IO::Bits;
  int64_t batch, n;
  const Bits* model_output;  // 2B rows [uncond; cond]
  int64_t model_output_stride;
  Bits* extra;               // B rows, or null; written only with has_momentum
  int64_t extra_stride;
  int32_t has_momentum;
  float momentum;
  float* out;                // [B, 9]
};

constexpr int kGramItems = 2;

template <class IO, int VEC>
__global__ void __launch_bounds__(kReduceThreads) guidance_gram_kernel(const GuidanceGramParams<IO> p) {
  using Bits = typename IO::Bits;
  using P = Pack<IO, VEC>;
  const MergeGram merge;
  const int64_t nvec = p.n / VEC;
  // The blocks of a row (a cluster, or one block) interleave their packs.
  const int64_t stride = int64_t(gridDim.x) * kReduceThreads;
  const int64_t first = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;
  const bool has_e = p.extra != nullptr;                // uniform over the grid
  const bool update = has_e && p.has_momentum != 0;

  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const Bits* u_row = p.model_output + b * p.model_output_stride;
    const Bits* c_row = p.model_output + (p.batch + b) * p.model_output_stride;
    Bits* e_row = p.extra + b * p.extra_stride;

    GramSums acc = MergeGram::identity();
    for (int64_t k0 = first; k0 < nvec; k0 += kGramItems * stride) {
      P u[kGramItems], c[kGramItems], e[kGramItems];
      int valid = 0;
#pragma unroll
      for (int i = 0; i < kGramItems; ++i) {
        const int64_t k = k0 + i * stride;
        if (k < nvec) {
          u[i] = load_pack<IO, VEC>(u_row + k * VEC);
          c[i] = load_pack<IO, VEC>(c_row + k * VEC);
          if (has_e) e[i] = load_pack<IO, VEC>(e_row + k * VEC);
          valid = i + 1;  // the valid packs are a prefix
        }
      }
      float part[kGramColumns] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < kGramItems; ++i) {
        if (i >= valid) break;
        if (update) {
          // e = (c - u) + beta e, stored in dtype; the stored pack is the one reduced below.
          float next[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float cf = pack_get(c[i], j), uf = pack_get(u[i], j);
            next[j] = (cf - uf) + p.momentum * pack_get(e[i], j);
          }
          e[i] = make_pack<IO, VEC>(next);
          store_pack<IO, VEC>(e_row + (k0 + i * stride) * VEC, e[i]);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float cf = pack_get(c[i], j), uf = pack_get(u[i], j);
          part[kCC] += cf * cf;
          part[kCU] += cf * uf;
          part[kUU] += uf * uf;
          part[kSumC] += cf;
          part[kSumU] += uf;
          if (has_e) {
            const float ef = pack_get(e[i], j);
            part[kCE] += cf * ef;
            part[kUE] += uf * ef;
            part[kEE] += ef * ef;
            part[kSumE] += ef;
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kGramColumns; ++k) acc.s[k] += double(part[k]);
    }

    acc = block_reduce(acc, merge);
    if (gridDim.x > 1) acc = cluster_reduce(acc, merge);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      float* out = p.out + kGramColumns * b;
#pragma unroll
      for (int k = 0; k < kGramColumns; ++k) out[k] = float(acc.s[k]);
    }
  }
}

template <class IO, int VEC>
void launch_guidance_gram(const GuidanceGramParams<IO>& p, cudaStream_t stream) {
  const DeviceInfo info = current_device_info("guidance_gram");
  const int blocks = blocks_per_row(p.batch, p.n, 8192, info);
  launch_row_reduction(&guidance_gram_kernel<IO, VEC>, blocks, p.batch, stream, "guidance_gram", p);
}

}  // namespace

void guidance_gram(const GuidanceGramArgs& args, void* stream) {
  if (args.batch <= 0) return;
  dispatch_dtype(args.dtype, "guidance_gram", [&](auto io) {
    using IO = decltype(io);
    using Bits = typename IO::Bits;
    GuidanceGramParams<IO> p;
    p.batch = args.batch;
    p.n = args.n;
    p.model_output = static_cast<const Bits*>(args.model_output);
    p.model_output_stride = args.model_output_stride;
    p.extra = static_cast<Bits*>(args.extra);
    p.extra_stride = args.extra_stride;
    p.has_momentum = args.has_momentum;
    p.momentum = args.momentum;
    p.out = args.out;
    constexpr int kVec = kVec16<IO>;
    if (args.n % kVec == 0 && rows_aligned16(args.model_output, args.model_output_stride, sizeof(Bits)) &&
        rows_aligned16(args.extra, args.extra_stride, sizeof(Bits))) {
      launch_guidance_gram<IO, kVec>(p, as_stream(stream));
    } else {
      launch_guidance_gram<IO, 1>(p, as_stream(stream));
    }
  });
}

}  // namespace fastguide::cuda
