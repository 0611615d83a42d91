// Per-sample CFG-rescale factor (Lin et al. 2023; diffusers' rescale_noise_cfg):
//   r_b = phi * std(cond_b) / std(guided_b) + (1 - phi),  guided = u + w_b (c - u),  unbiased std.
//
// Both standard deviations come from one pass over u and c. Each thread keeps (count, mean, M2) per
// quantity: every batch of loaded elements is reduced exactly around its own mean in registers, then
// merged with Chan et al.'s pairwise update, as are the thread, warp, block and cluster partials. No
// sum of squares is ever subtracted from a squared sum, so there is no cancellation when |mean| >> std.
#include "dtype_io.cuh"
#include "fastguide_cuda.h"
#include "reduce.cuh"

namespace fastguide::cuda {
namespace {

using namespace detail;

struct Moments {
  float count, mean_c, m2_c, mean_g, m2_g;
};

struct MergeMoments {
  static __device__ __forceinline__ Moments identity() { return {0.f, 0.f, 0.f, 0.f, 0.f}; }
  __device__ __forceinline__ Moments operator()(const Moments& a, const Moments& b) const {
    if (b.count == 0.f) return a;
    if (a.count == 0.f) return b;
    const float count = a.count + b.count;
    const float frac = b.count / count;
    const float dc = b.mean_c - a.mean_c;
    const float dg = b.mean_g - a.mean_g;
    Moments r;
    r.count = count;
    r.mean_c = a.mean_c + dc * frac;
    r.m2_c = a.m2_c + b.m2_c + dc * dc * a.count * frac;
    r.mean_g = a.mean_g + dg * frac;
    r.m2_g = a.m2_g + b.m2_g + dg * dg * a.count * frac;
    return r;
  }
};

template <class IO>
struct CfgRescaleFactorParams {
  using Bits = typename IO::Bits;
  int64_t batch, n;
  const Bits* model_output;
  int64_t model_output_stride;
  const float* scale;
  int64_t scale_stride;
  float phi;
  float* factor;
};

constexpr int kRescaleItems = 2;

template <class IO, int VEC>
__global__ void __launch_bounds__(kReduceThreads)
    cfg_rescale_factor_kernel(const CfgRescaleFactorParams<IO> p) {
  using Bits = typename IO::Bits;
  using P = Pack<IO, VEC>;
  const MergeMoments merge;
  const int64_t nvec = p.n / VEC;
  // The blocks of a row (a cluster, or one block) interleave their packs.
  const int64_t stride = int64_t(gridDim.x) * kReduceThreads;
  const int64_t first = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;

  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const Bits* u_row = p.model_output + b * p.model_output_stride;
    const Bits* c_row = p.model_output + (p.batch + b) * p.model_output_stride;
    const float w = __ldg(p.scale + b * p.scale_stride);

    Moments acc = MergeMoments::identity();
    for (int64_t k0 = first; k0 < nvec; k0 += kRescaleItems * stride) {
      P u[kRescaleItems], c[kRescaleItems];
      int valid = 0;
#pragma unroll
      for (int i = 0; i < kRescaleItems; ++i) {
        const int64_t k = k0 + i * stride;
        if (k < nvec) {
          u[i] = load_pack<IO, VEC>(u_row + k * VEC);
          c[i] = load_pack<IO, VEC>(c_row + k * VEC);
          valid = i + 1;  // the valid packs are a prefix
        }
      }
      float cv[kRescaleItems * VEC], gv[kRescaleItems * VEC];
      float sum_c = 0.f, sum_g = 0.f;
#pragma unroll
      for (int i = 0; i < kRescaleItems; ++i) {
        if (i >= valid) break;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float uf = pack_get(u[i], j), cf = pack_get(c[i], j);
          cv[i * VEC + j] = cf;
          gv[i * VEC + j] = uf + w * (cf - uf);
          sum_c += cv[i * VEC + j];
          sum_g += gv[i * VEC + j];
        }
      }
      Moments batch;
      batch.count = float(valid * VEC);
      batch.mean_c = sum_c / batch.count;
      batch.mean_g = sum_g / batch.count;
      batch.m2_c = 0.f;
      batch.m2_g = 0.f;
#pragma unroll
      for (int e = 0; e < kRescaleItems * VEC; ++e) {
        if (e >= valid * VEC) break;
        const float dc = cv[e] - batch.mean_c, dg = gv[e] - batch.mean_g;
        batch.m2_c += dc * dc;
        batch.m2_g += dg * dg;
      }
      acc = merge(acc, batch);
    }

    acc = block_reduce(acc, merge);
    if (gridDim.x > 1) acc = cluster_reduce(acc, merge);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      // Unbiased variances; their ratio is the ratio of the std's. count <= 1 gives NaN, as torch.std.
      const float dof = acc.count - 1.f;
      const float ratio = sqrtf(acc.m2_c / dof) / sqrtf(acc.m2_g / dof);
      p.factor[b] = p.phi * ratio + (1.f - p.phi);
    }
  }
}

template <class IO, int VEC>
void launch_cfg_rescale_factor(const CfgRescaleFactorParams<IO>& p, cudaStream_t stream) {
  const DeviceInfo info = current_device_info("cfg_rescale_factor");
  const int blocks = blocks_per_row(p.batch, p.n, 8192, info);
  launch_row_reduction(&cfg_rescale_factor_kernel<IO, VEC>, blocks, p.batch, stream, "cfg_rescale_factor", p);
}

}  // namespace

void cfg_rescale_factor(const CfgRescaleFactorArgs& args, void* stream) {
  if (args.batch <= 0) return;
  dispatch_dtype(args.dtype, "cfg_rescale_factor", [&](auto io) {
    using IO = decltype(io);
    using Bits = typename IO::Bits;
    CfgRescaleFactorParams<IO> p;
    p.batch = args.batch;
    p.n = args.n;
    p.model_output = static_cast<const Bits*>(args.model_output);
    p.model_output_stride = args.model_output_stride;
    p.scale = args.scale;
    p.scale_stride = args.scale_stride;
    p.phi = args.phi;
    p.factor = args.factor;
    constexpr int kVec = kVec16<IO>;
    if (args.n % kVec == 0 && rows_aligned16(args.model_output, args.model_output_stride, sizeof(Bits))) {
      launch_cfg_rescale_factor<IO, kVec>(p, as_stream(stream));
    } else {
      launch_cfg_rescale_factor<IO, 1>(p, as_stream(stream));
    }
  });
}

}  // namespace fastguide::cuda
