// The fused guided sampler step: one pass over x, the model output(s), the guidance gradients, the noise
// and the previous x0 (and the one before it), writing x_out (optionally twice: out2, a loop's next [x; x]
// model input) and/or x0^ (the row formula of fastguide/core/layout.py, computed in fp32).
//
// Grid: x = chunk of a row, y = row (sample). Each thread moves ITEMS packs of every input, issuing all
// loads before any arithmetic so that enough bytes are in flight to saturate HBM. Which element streams
// are present is a compile-time feature mask, so an absent term costs no load, no register and no math;
// misaligned or odd-sized tensors take a scalar kernel whose features are runtime flags.
//
// Heterogeneous batches (GuidedStepArgs::step_rows / uncond_rows) are read per block row: one index load
// per row and thread for each map that is present, behind a branch that is uniform over the grid, so a
// call without them runs the same loads as before.
//
// Guidance beyond CFG (GuidedStepArgs::combine, extra, eps_from_uncond) runs in kernels of their own
// (feature bits kBeyondCfg and kExtra), so the kernels of plain CFG and of no guidance are exactly what they
// were: within them a per-sample linear combine m = a c + b u (+ d e) replaces u + w (c - u), its
// coefficients read once per row, and eps~ may come from u; both are branches uniform over the grid. To keep
// the number of kernels down, those kernels take the classifier-guidance gradients (g_score, g_mean: rarely
// paired with these methods) as runtime flags too, so there are 16 of them per dtype rather than 56.
#include <array>
#include <utility>

#include "dtype_io.cuh"
#include "fastguide_cuda.h"

namespace fastguide::cuda {
namespace {

using namespace detail;

// Element streams besides x and the (cond) prediction; each is one bit of a kernel's feature mask.
enum StepFeature : int {
  kCfg = 1 << 0,         // an uncond prediction may be present: 2B rows [uncond; cond], or sparse rows
  kScoreGrad = 1 << 1,   // g_score
  kMeanGrad = 1 << 2,    // g_mean (read only when out is written)
  kNoise = 1 << 3,       // noise
  kX0Prev = 1 << 4,      // x0_prev and/or x0_prev2 (read only when out is written; which: a runtime branch)
  kLearnedVar = 1 << 5,  // variance channels (read only when out is written and Sigma is used)
  kExtra = 1 << 6,       // extra e, the third term of a combine (only with kBeyondCfg and combine)
  // Not a stream: guidance beyond CFG (with kCfg), a combine (read per row) and/or eps~ from u. Which of the
  // two are set is a runtime branch, uniform over the grid; with kExtra a combine is known to be present.
  kBeyondCfg = 1 << 7,
};
constexpr int kNumFeatureMasks = 1 << 8;
constexpr int kStreamFeatures = kNumFeatureMasks - 1 - kBeyondCfg;

template <int MASK>
struct StaticFeatures {
  __device__ __forceinline__ constexpr bool has(int feature) const { return (MASK & feature) != 0; }
};

struct RuntimeFeatures {
  int mask;
  __device__ __forceinline__ bool has(int feature) const { return (mask & feature) != 0; }
};

// The features of a kernel for guidance beyond CFG: MASK's at compile time, except those of kRuntimeInBeyond,
// which come from the call's mask (a branch uniform over the grid).
constexpr int kRuntimeInBeyond = kScoreGrad | kMeanGrad;

template <int MASK>
struct BeyondCfgFeatures {
  static_assert((MASK & kRuntimeInBeyond) == 0 && (MASK & kCfg) && (MASK & kBeyondCfg), "not a beyond-CFG mask");
  int mask;
  __device__ __forceinline__ bool has(int feature) const {
    return (feature & kRuntimeInBeyond) ? (mask & feature) != 0 : (MASK & feature) != 0;
  }
};

// GuidedStepArgs with typed pointers; strides in elements.
template <class IO>
struct GuidedStepParams {
  using Bits = typename IO::Bits;
  int64_t batch, n;
  const Bits* sample;
  int64_t sample_stride;
  const Bits* model_output;
  int64_t model_output_stride;
  const float* scale;
  int64_t scale_stride;
  const float* mfactor;
  const Bits* g_score;
  int64_t g_score_stride;
  const Bits* g_mean;
  int64_t g_mean_stride;
  const Bits* noise;
  int64_t noise_stride;
  const Bits* x0_prev;   // with kX0Prev: x0_prev, x0_prev2 or both may be present (null when absent)
  int64_t x0_prev_stride;
  const Bits* x0_prev2;
  int64_t x0_prev2_stride;
  int32_t clip_mode;
  float clip_lo, clip_hi;
  const float* threshold;
  const float* table;
  const int64_t* step_ptr;
  int64_t step;
  const int64_t* step_rows;    // [B] table row per sample (overrides step_ptr / step), or null
  const int64_t* uncond_rows;  // [B] sparse CFG map (with kCfg): uncond row of sample b or < 0, or null
  Bits* out;
  int64_t out_stride;
  Bits* x0_out;
  int64_t x0_out_stride;
  Bits* out2;  // second copy of out, or null
  int64_t out2_stride;
  const float* combine;        // [B, 3] (a, b, d) per sample (with kBeyondCfg; dense CFG, no scale), or null
  const Bits* extra;           // e (with kExtra)
  int64_t extra_stride;
  int32_t eps_from_uncond;     // eps~ from u instead of m (with kBeyondCfg)
};

constexpr int kStepThreads = 256;
constexpr int kScalarItems = 2;

// 16-byte packs per thread per stream. Two keep >= 64 B per thread in flight when only x and the
// prediction (and one more stream) are read; with five or more streams one pack each is as many bytes
// and half the registers.
constexpr int vector_items(int mask) { return 2 + __builtin_popcount(mask & kStreamFeatures) <= 4 ? 2 : 1; }

// No __restrict__ on the data pointers: out may be sample, x0_out may be x0_prev or x0_prev2. Each element
// is read by the thread that writes it, and every read of a pack happens before its writes, so exact
// aliasing is safe.
template <class IO, int VEC, int ITEMS, class Features>
__global__ void __launch_bounds__(kStepThreads)
    guided_step_kernel(const GuidedStepParams<IO> p, const Features feat) {
  using Bits = typename IO::Bits;
  using P = Pack<IO, VEC>;

  const bool write_out = p.out != nullptr;
  const bool write_out2 = write_out && p.out2 != nullptr;  // uniform over the grid: no divergence
  const bool write_x0 = p.x0_out != nullptr;
  // The multistep history (kX0Prev, set for x0_prev, x0_prev2 or both; no bit of its own, which would
  // double the kernels): one stream slot, xp, holds x0_prev (coefficient F), or x0_prev2 (F2) when that
  // comes alone. With both (third order), x0_prev2 is loaded once a pack's results are formed, when the
  // other packs of that item are dead, rather than with the other streams: that keeps the kernels near the
  // registers of one history stream (a second pack per item in flight would cost every x0_prev call
  // occupancy), at one more exposed load latency per item for third-order calls. Branches uniform over
  // the grid.
  const bool has_xp = feat.has(kX0Prev) && p.x0_prev != nullptr;
  const bool late_xp2 = has_xp && p.x0_prev2 != nullptr;
  const int64_t nvec = p.n / VEC;
  const int64_t first = int64_t(blockIdx.x) * (kStepThreads * ITEMS) + threadIdx.x;

  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const Bits* x_row = p.sample + b * p.sample_stride;
    // The prediction rows: without CFG row b; dense CFG [uncond; cond], rows b and B + b; sparse CFG
    // (uncond_rows) the cond prediction in row b and the uncond one in row uncond_rows[b], or none. A
    // sample without one skips the combine (m = c exactly; u = c with w = 1 would turn an infinite c into
    // NaN), and its uncond loads.
    const Bits* c_row = p.model_output + b * p.model_output_stride;
    const Bits* u_row = c_row;
    bool has_u = feat.has(kCfg);
    if (feat.has(kCfg)) {
      if (p.uncond_rows == nullptr) {
        c_row = p.model_output + (p.batch + b) * p.model_output_stride;
      } else {
        const int64_t u_index = __ldg(p.uncond_rows + b);
        has_u = u_index >= 0;
        if (has_u) u_row = p.model_output + u_index * p.model_output_stride;
      }
    }
    const Bits* v_row = c_row + p.n;  // learned variance: second half of the cond row
    const Bits* gs_row = p.g_score + b * p.g_score_stride;
    const Bits* gm_row = p.g_mean + b * p.g_mean_stride;
    const Bits* z_row = p.noise + b * p.noise_stride;
    // The history slot; the late x0_prev2 address is formed where it is loaded (from the parameters, not
    // a row pointer held over the whole row: fewer registers).
    const Bits* xp_row = has_xp ? p.x0_prev + b * p.x0_prev_stride : p.x0_prev2 + b * p.x0_prev2_stride;
    const Bits* e_row = p.extra + b * p.extra_stride;
    Bits* out_row = p.out + b * p.out_stride;
    Bits* out2_row = p.out2 + b * p.out2_stride;
    Bits* x0_row = p.x0_out + b * p.x0_out_stride;

    P x[ITEMS], c[ITEMS], u[ITEMS], v[ITEMS], gs[ITEMS], gm[ITEMS], z[ITEMS], xp[ITEMS], ex[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t k = first + i * kStepThreads;
      if (k >= nvec) continue;
      const int64_t e = k * VEC;
      x[i] = load_pack<IO, VEC>(x_row + e);
      c[i] = load_pack<IO, VEC>(c_row + e);
      if (feat.has(kCfg) && has_u) u[i] = load_pack<IO, VEC>(u_row + e);
      if (feat.has(kScoreGrad)) gs[i] = load_pack<IO, VEC>(gs_row + e);
      if (feat.has(kNoise)) z[i] = load_pack<IO, VEC>(z_row + e);
      if (feat.has(kMeanGrad)) gm[i] = load_pack<IO, VEC>(gm_row + e);
      if (feat.has(kX0Prev)) xp[i] = load_pack<IO, VEC>(xp_row + e);  // the bit: one of the two is present
      if (feat.has(kLearnedVar)) v[i] = load_pack<IO, VEC>(v_row + e);
      if (feat.has(kExtra)) ex[i] = load_pack<IO, VEC>(e_row + e);
    }

    // Per-row scalars and the coefficient row are read after the data loads are issued, so their
    // latency (the step index, then the row it selects) overlaps the loads instead of preceding them.
    // Beyond CFG (a constant false in the kernels without kBeyondCfg): a combine replaces the scale (there is
    // none then), and eps~ may come from u; with kExtra there is always a combine.
    const bool beyond = feat.has(kCfg) && feat.has(kBeyondCfg);
    const bool combine = beyond && (feat.has(kExtra) || p.combine != nullptr);
    const bool eps_u = beyond && p.eps_from_uncond != 0;
    float w = 0.f, ka = 0.f, kb = 0.f, kd = 0.f;
    if (combine) {
      const float* k = p.combine + 3 * b;
      ka = __ldg(k);
      kb = __ldg(k + 1);
      if (feat.has(kExtra)) kd = __ldg(k + 2);
    } else if (feat.has(kCfg)) {
      w = __ldg(p.scale + b * p.scale_stride);
    }
    // Multiplying by exactly 1 is an identity (NaN and Inf included), so an absent factor changes nothing.
    const float mfac = p.mfactor != nullptr ? __ldg(p.mfactor + b) : 1.f;
    // Clipping as clamp(x0, lo, hi) * clip_mul: none is (-inf, inf, 1), a range is (lo, hi, 1) and a
    // per-sample threshold s is (-s, s, 1/s), so the element loop has no branch on the mode.
    float lo = -INFINITY, hi = INFINITY, clip_mul = 1.f;
    if (p.clip_mode == kClipRange) {
      lo = p.clip_lo;
      hi = p.clip_hi;
    } else if (p.clip_mode == kClipThreshold) {
      hi = __ldg(p.threshold + b);
      lo = -hi;
      clip_mul = 1.f / hi;
    }

    // The step index lives on the device so a CUDA-graph replay reads the current one; with step_rows
    // every sample has its own.
    const int64_t step = p.step_rows != nullptr ? __ldg(p.step_rows + b)
                         : p.step_ptr != nullptr ? __ldg(p.step_ptr) : p.step;
    // Coefficients are uniform over the block row (over the grid without step_rows; cached after the first
    // warp); plain loads through a restrict pointer, so those of absent terms are dropped by the compiler.
    const float* __restrict__ coef = p.table + step * kNumCols;
    const float px = coef[P_X], pm = coef[P_M], pg = coef[P_G], pz = coef[P_Z];
    const float qx = coef[Q_X], qm = coef[Q_M], qg = coef[Q_G], qz = coef[Q_Z];
    const float ca = coef[A], cb = coef[B], cc = coef[C], cd = coef[D];
    const float ce = coef[E], cdv = coef[DV], cev = coef[EV];
    const float lv_max = coef[LV_MAX], lv_min = coef[LV_MIN];
    const float cxp = coef[has_xp ? F : F2], cf2 = coef[F2];  // the history slot's; x0_prev2's with both

#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t k = first + i * kStepThreads;
      if (k >= nvec) continue;
      const int64_t e = k * VEC;
      float out_vals[VEC], x0_vals[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xf = pack_get(x[i], j);
        float m = pack_get(c[i], j);
        float eps_src;  // the prediction eps~ is formed from: m, or with eps_from_uncond u (unscaled)
        if (beyond) {
          // A sample without an uncond row (sparse map, no combine) has u = c, as in the reference.
          const float uf = has_u ? pack_get(u[i], j) : m;
          if (combine) {
            // m = a c + b u + d e, in the reference's order (a combine has the dense layout: has_u).
            float t = ka * m;
            t += kb * uf;
            if (feat.has(kExtra)) t += kd * pack_get(ex[i], j);
            m = t;
          } else if (has_u) {
            m = uf + w * (m - uf);
          }
          m *= mfac;
          eps_src = eps_u ? uf : m;
        } else {
          if (feat.has(kCfg) && has_u) {
            const float uf = pack_get(u[i], j);
            m = uf + w * (m - uf);
          }
          m *= mfac;
          eps_src = m;
        }

        float x0 = px * xf + pm * m;
        float eps = qx * xf + qm * eps_src;
        float zf = 0.f;
        if (feat.has(kNoise)) {
          zf = pack_get(z[i], j);
          x0 += pz * zf;
          eps += qz * zf;
        }
        // Comparisons (not fminf/fmaxf) so that a NaN stays NaN, as torch.clamp does.
        x0 = x0 < lo ? lo : x0;
        x0 = x0 > hi ? hi : x0;
        x0 *= clip_mul;
        // The score correction enters after clipping (guided-diffusion's condition_score).
        if (feat.has(kScoreGrad)) {
          const float g = pack_get(gs[i], j);
          x0 += pg * g;
          eps += qg * g;
        }
        // Both results are always formed (a few FMAs) and stored only when asked, so the element loop
        // has no branch.
        x0_vals[j] = x0;
        float res = ca * xf + cb * x0 + cc * eps;
        float variance = 0.f;
        if (feat.has(kLearnedVar)) {
          const float frac = (pack_get(v[i], j) + 1.f) * 0.5f;
          variance = expf(frac * lv_max + (1.f - frac) * lv_min);
        }
        if (feat.has(kMeanGrad)) {
          const float shift = feat.has(kLearnedVar) ? cd + cdv * variance : cd;
          res += shift * pack_get(gm[i], j);
        }
        if (feat.has(kNoise)) {
          const float amp = feat.has(kLearnedVar) ? ce + cev * sqrtf(variance) : ce;
          res += amp * zf;
        }
        if (feat.has(kX0Prev)) res += cxp * pack_get(xp[i], j);
        out_vals[j] = res;
      }
      // With both histories, x0_prev2's term comes last (the reference's order), read before any store of
      // the pack (x0_out or out may be x0_prev2).
      if (late_xp2) {
        const P xp2 = load_pack<IO, VEC>(p.x0_prev2 + b * p.x0_prev2_stride + e);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out_vals[j] += cf2 * pack_get(xp2, j);
      }
      // Store order x0, out, out2: an output that is x0_out too holds the result, as in the reference.
      if (write_x0) store_pack<IO, VEC>(x0_row + e, make_pack<IO, VEC>(x0_vals));
      if (write_out) {
        const P packed = make_pack<IO, VEC>(out_vals);
        store_pack<IO, VEC>(out_row + e, packed);
        if (write_out2) store_pack<IO, VEC>(out2_row + e, packed);
      }
    }
  }
}

template <class IO, int VEC, int ITEMS, class Features>
void launch_guided_step(const GuidedStepParams<IO>& p, Features feat, cudaStream_t stream) {
  const int64_t per_block = int64_t(kStepThreads) * ITEMS;
  const int64_t chunks = (p.n / VEC + per_block - 1) / per_block;
  const dim3 grid(unsigned(chunks), grid_rows(p.batch));
  guided_step_kernel<IO, VEC, ITEMS, Features><<<grid, kStepThreads, 0, stream>>>(p, feat);
}

template <class IO>
using GuidedStepLauncher = void (*)(const GuidedStepParams<IO>&, int mask, cudaStream_t);

template <class IO, int MASK>
void launch_vectorized(const GuidedStepParams<IO>& p, int mask, cudaStream_t stream) {
  if constexpr ((MASK & kBeyondCfg) != 0) {
    // The pack count as if the runtime streams were present (they hold registers either way).
    launch_guided_step<IO, kVec16<IO>, vector_items(MASK | kRuntimeInBeyond)>(p, BeyondCfgFeatures<MASK>{mask},
                                                                               stream);
  } else {
    launch_guided_step<IO, kVec16<IO>, vector_items(MASK)>(p, StaticFeatures<MASK>{}, stream);
  }
}

// Sigma only feeds the g_mean and noise terms, so feature_mask() never sets kLearnedVar without one of
// them; those masks share the kernel without kLearnedVar instead of instantiating dead variants. Likewise
// kBeyondCfg comes only with kCfg and kExtra only with kBeyondCfg (extra is a combine's third term).
// The beyond-CFG kernels' mask leaves out their runtime features.
constexpr int canonical_mask(int mask) {
  if ((mask & kLearnedVar) && !(mask & (kMeanGrad | kNoise))) mask &= ~kLearnedVar;
  if (!(mask & kCfg)) mask &= ~kBeyondCfg;
  if (!(mask & kBeyondCfg)) mask &= ~kExtra;
  if (mask & kBeyondCfg) mask &= ~kRuntimeInBeyond;
  return mask;
}

template <class IO, int... MASKS>
constexpr std::array<GuidedStepLauncher<IO>, sizeof...(MASKS)> vectorized_launchers(
    std::integer_sequence<int, MASKS...>) {
  return {&launch_vectorized<IO, canonical_mask(MASKS)>...};
}

template <class IO>
GuidedStepParams<IO> typed_params(const GuidedStepArgs& a) {
  using Bits = typename IO::Bits;
  GuidedStepParams<IO> p;
  p.batch = a.batch;
  p.n = a.n;
  p.sample = static_cast<const Bits*>(a.sample);
  p.sample_stride = a.sample_stride;
  p.model_output = static_cast<const Bits*>(a.model_output);
  p.model_output_stride = a.model_output_stride;
  p.scale = a.scale;
  p.scale_stride = a.scale_stride;
  p.mfactor = a.mfactor;
  p.g_score = static_cast<const Bits*>(a.g_score);
  p.g_score_stride = a.g_score_stride;
  p.g_mean = static_cast<const Bits*>(a.g_mean);
  p.g_mean_stride = a.g_mean_stride;
  p.noise = static_cast<const Bits*>(a.noise);
  p.noise_stride = a.noise_stride;
  p.x0_prev = static_cast<const Bits*>(a.x0_prev);
  p.x0_prev_stride = a.x0_prev_stride;
  p.x0_prev2 = static_cast<const Bits*>(a.x0_prev2);
  p.x0_prev2_stride = a.x0_prev2_stride;
  p.clip_mode = a.clip_mode;
  p.clip_lo = a.clip_lo;
  p.clip_hi = a.clip_hi;
  p.threshold = a.threshold;
  p.table = a.table;
  p.step_ptr = a.step_ptr;
  p.step = a.step;
  p.step_rows = a.step_rows;
  p.uncond_rows = a.has_cfg ? a.uncond_rows : nullptr;  // a sparse map only means something with CFG
  p.combine = a.has_cfg ? a.combine : nullptr;          // so does a combine (with the dense layout)
  p.extra = static_cast<const Bits*>(p.combine != nullptr ? a.extra : nullptr);  // a combine's third term
  p.extra_stride = a.extra_stride;
  p.eps_from_uncond = a.has_cfg ? a.eps_from_uncond : 0;
  p.out = static_cast<Bits*>(a.out);
  p.out_stride = a.out_stride;
  p.x0_out = static_cast<Bits*>(a.x0_out);
  p.x0_out_stride = a.x0_out_stride;
  p.out2 = static_cast<Bits*>(a.out2);
  p.out2_stride = a.out2_stride;
  return p;
}

// The streams this call actually reads. Terms that only feed x_out are dropped for an x0-only call, and
// the variance channels are read only when a term uses Sigma, so nothing unused is ever loaded.
int feature_mask(const GuidedStepArgs& a) {
  const bool write_out = a.out != nullptr;
  int mask = 0;
  if (a.has_cfg) mask |= kCfg;
  if (a.g_score) mask |= kScoreGrad;
  if (a.noise) mask |= kNoise;
  if (write_out && a.g_mean) mask |= kMeanGrad;
  if (write_out && (a.x0_prev || a.x0_prev2)) mask |= kX0Prev;
  if (write_out && a.learned_variance && (a.g_mean || a.noise)) mask |= kLearnedVar;
  if (a.has_cfg && (a.combine || a.eps_from_uncond)) mask |= kBeyondCfg;
  if (a.has_cfg && a.combine && a.extra) mask |= kExtra;
  return mask;
}

bool vectorizable(const GuidedStepArgs& a, int mask, int64_t elem_size) {
  const int64_t vec = 16 / elem_size;
  if (a.n % vec != 0) return false;
  return rows_aligned16(a.sample, a.sample_stride, elem_size) &&
         rows_aligned16(a.model_output, a.model_output_stride, elem_size) &&
         rows_aligned16((mask & kScoreGrad) ? a.g_score : nullptr, a.g_score_stride, elem_size) &&
         rows_aligned16((mask & kMeanGrad) ? a.g_mean : nullptr, a.g_mean_stride, elem_size) &&
         rows_aligned16((mask & kNoise) ? a.noise : nullptr, a.noise_stride, elem_size) &&
         rows_aligned16((mask & kX0Prev) ? a.x0_prev : nullptr, a.x0_prev_stride, elem_size) &&
         rows_aligned16((mask & kX0Prev) ? a.x0_prev2 : nullptr, a.x0_prev2_stride, elem_size) &&
         rows_aligned16((mask & kExtra) ? a.extra : nullptr, a.extra_stride, elem_size) &&
         rows_aligned16(a.out, a.out_stride, elem_size) &&
         rows_aligned16(a.x0_out, a.x0_out_stride, elem_size) &&
         rows_aligned16(a.out ? a.out2 : nullptr, a.out2_stride, elem_size);
}

}  // namespace

void guided_step(const GuidedStepArgs& args, void* stream) {
  if (args.batch <= 0 || args.n <= 0 || (args.out == nullptr && args.x0_out == nullptr)) return;
  const int mask = feature_mask(args);
  dispatch_dtype(args.dtype, "guided_step", [&](auto io) {
    using IO = decltype(io);
    const GuidedStepParams<IO> p = typed_params<IO>(args);
    if (vectorizable(args, mask, sizeof(typename IO::Bits))) {
      static constexpr auto launchers =
          vectorized_launchers<IO>(std::make_integer_sequence<int, kNumFeatureMasks>{});
      launchers[mask](p, mask, as_stream(stream));
    } else {
      launch_guided_step<IO, 1, kScalarItems>(p, RuntimeFeatures{mask}, as_stream(stream));
    }
  });
  check_launch("guided_step");
}

}  // namespace fastguide::cuda
