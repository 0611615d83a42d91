// Gradient of J = tau1 * l_y - logsumexp(tau2 * l) with respect to the logits (Ma et al. 2023, eq. 9):
//   dJ/dl_k = scale_r * (tau1 * [k == y_r] - tau2 * softmax(tau2 * l_r)_k).
//
// One block per row. Pass 1 keeps an online (max, sum of exp(v - max)) per thread over the row and merges
// them across the block, so no exp ever sees a positive argument: fp16/bf16 logits and K = 21,843 classes
// cannot overflow. Pass 2 re-reads the row (from L2) and writes the gradient. Rows are walked as an
// unaligned head, a body of 16-byte packs and a tail, so an odd K still gets vector loads.
#include "dtype_io.cuh"
#include "fastguide_cuda.h"
#include "reduce.cuh"

namespace fastguide::cuda {
namespace {

using namespace detail;

// sum = sum_k exp(v_k - max) over the elements seen so far.
struct LseState {
  float max, sum;
};

__device__ __forceinline__ void lse_add(LseState& s, float v) {
  if (v > s.max) {
    s.sum = s.sum * expf(s.max - v) + 1.f;
    s.max = v;
  } else if (v != -INFINITY) {  // -inf adds nothing (and -inf - -inf would be NaN); NaN propagates
    s.sum += expf(v - s.max);
  }
}

struct MergeLse {
  static __device__ __forceinline__ LseState identity() { return {-INFINITY, 0.f}; }
  __device__ __forceinline__ LseState operator()(const LseState& a, const LseState& b) const {
    const float m = fmaxf(a.max, b.max);
    float sum = 0.f;
    if (a.sum != 0.f) sum += a.sum * expf(a.max - m);
    if (b.sum != 0.f) sum += b.sum * expf(b.max - m);
    return {m, sum};
  }
};

template <class IO>
struct TemperatureLseGradParams {
  using Bits = typename IO::Bits;
  int64_t rows, k;
  const Bits* logits;
  int64_t logits_stride;
  const int64_t* labels;
  float tau1, tau2;
  const float* scale;
  Bits* out;
  int64_t out_stride;
};

constexpr int kLseThreads = 512;

// Elements before the first 16-byte boundary of a row (capped at the row length).
template <class IO>
__device__ __forceinline__ int64_t head_elements(const void* row, int64_t k) {
  const int64_t bytes = int64_t((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15);
  const int64_t head = bytes / int64_t(sizeof(typename IO::Bits));
  return head < k ? head : k;
}

template <class IO, int VEC>
__global__ void __launch_bounds__(kLseThreads)
    temperature_lse_grad_kernel(const TemperatureLseGradParams<IO> p) {
  using Bits = typename IO::Bits;
  using P = Pack<IO, VEC>;
  const MergeLse merge;
  const int64_t r = blockIdx.x;
  const Bits* __restrict__ row = p.logits + r * p.logits_stride;
  Bits* __restrict__ out_row = p.out + r * p.out_stride;
  const float tau2 = p.tau2;
  const int tid = threadIdx.x;

  const int64_t head = head_elements<IO>(row, p.k);
  const int64_t body = (p.k - head) / VEC;  // packs
  const int64_t tail = head + body * VEC;

  // Pass 1: online max / sum of the tempered logits.
  LseState st = MergeLse::identity();
  for (int64_t e = tid; e < head; e += kLseThreads) lse_add(st, __fmul_rn(tau2, IO::to_float(row[e])));
#pragma unroll 4
  for (int64_t v = tid; v < body; v += kLseThreads) {
    const P pack = load_pack<IO, VEC>(row + head + v * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) lse_add(st, __fmul_rn(tau2, pack_get(pack, j)));
  }
  for (int64_t e = tail + tid; e < p.k; e += kLseThreads) lse_add(st, __fmul_rn(tau2, IO::to_float(row[e])));

  st = block_reduce(st, merge);
  __shared__ LseState row_state;
  if (tid == 0) {
    // A +inf logit makes torch's softmax NaN for the whole row (inf - inf); do the same.
    if (st.max == INFINITY) st.sum = NAN;
    row_state = st;
  }
  __syncthreads();
  const float row_max = row_state.max, row_sum = row_state.sum;
  const int64_t label = __ldg(p.labels + r);
  const float tau1 = p.tau1;
  const float scale = p.scale != nullptr ? __ldg(p.scale + r) : 1.f;
  auto grad = [&](float logit, int64_t k) {
    float g = -tau2 * (expf(__fmul_rn(tau2, logit) - row_max) / row_sum);
    if (k == label) g += tau1;
    return g * scale;  // exactly g when there is no scale
  };

  // Pass 2: packs only when the output row has the same alignment as the logits row.
  const bool same_alignment = head_elements<IO>(out_row, p.k) == head;
  auto write_one = [&](int64_t e) { out_row[e] = IO::from_float(grad(IO::to_float(row[e]), e)); };
  if (VEC > 1 && same_alignment) {
    for (int64_t e = tid; e < head; e += kLseThreads) write_one(e);
#pragma unroll 4
    for (int64_t v = tid; v < body; v += kLseThreads) {
      const int64_t e0 = head + v * VEC;
      const P pack = load_pack<IO, VEC>(row + e0);
      float vals[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) vals[j] = grad(pack_get(pack, j), e0 + j);
      store_pack<IO, VEC>(out_row + e0, make_pack<IO, VEC>(vals));
    }
    for (int64_t e = tail + tid; e < p.k; e += kLseThreads) write_one(e);
  } else {
#pragma unroll 4
    for (int64_t e = tid; e < p.k; e += kLseThreads) write_one(e);
  }
}

}  // namespace

void temperature_lse_grad(const TemperatureLseGradArgs& args, void* stream) {
  if (args.rows <= 0 || args.k <= 0) return;
  dispatch_dtype(args.dtype, "temperature_lse_grad", [&](auto io) {
    using IO = decltype(io);
    using Bits = typename IO::Bits;
    TemperatureLseGradParams<IO> p;
    p.rows = args.rows;
    p.k = args.k;
    p.logits = static_cast<const Bits*>(args.logits);
    p.logits_stride = args.logits_stride;
    p.labels = args.labels;
    p.tau1 = args.tau1;
    p.tau2 = args.tau2;
    p.scale = args.scale;
    p.out = static_cast<Bits*>(args.out);
    p.out_stride = args.out_stride;
    if (args.rows > int64_t(0x7fffffff)) {
      throw std::runtime_error("fastguide.cuda.temperature_lse_grad: more than 2^31-1 rows");
    }
    const unsigned rows = unsigned(args.rows);
    temperature_lse_grad_kernel<IO, kVec16<IO>><<<rows, kLseThreads, 0, as_stream(stream)>>>(p);
  });
  check_launch("temperature_lse_grad");
}

}  // namespace fastguide::cuda
