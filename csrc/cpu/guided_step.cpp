// Fused guided sampler step on the CPU: the row formula of fastguide/layout.py, one tile at a time.
//
// A work item is one tile of one sample row. Its inputs are read as fp32 (converted into scratch when
// stored as fp16/bf16), the step runs as a few short loops over the tile that stay in L1 and vectorise,
// and the outputs are stored only after every input of the tile has been read: that is what lets an
// output alias an input exactly (out=sample). Optional terms are branches around whole loops, never
// multiplications by zero, so an absent tensor cannot inject NaN.
#include <cmath>

#include "fast_exp.h"
#include "fastguide_cpu.h"
#include "parallel.h"
#include "simd.h"
#include "storage.h"

namespace fastguide::cpu {
namespace {

constexpr int64_t kTile = 1024;

struct Scratch {
  // fp32 copies of fp16/bf16 inputs (unused for fp32 storage, which is read in place).
  alignas(64) float x[kTile];
  alignas(64) float uncond[kTile];
  alignas(64) float cond[kTile];
  alignas(64) float variance[kTile];
  alignas(64) float g_score[kTile];
  alignas(64) float g_mean[kTile];
  alignas(64) float noise[kTile];
  alignas(64) float x0_prev[kTile];
  // Intermediates and results.
  alignas(64) float x0[kTile];
  alignas(64) float eps[kTile];
  alignas(64) float sigma[kTile];
  alignas(64) float res[kTile];
};

const float* load_row(const StepArgs& a, const void* base, int64_t stride, int64_t row, int64_t begin,
                      int64_t len, float* buf) {
  return base ? load_f32(a.dtype, base, row * stride + begin, len, buf) : nullptr;
}

// x0_raw = P_X x + P_M m + P_Z z and eps = Q_X x + Q_M m + Q_Z z, with m = (u + w (c - u)) * mf (CFG) or
// c * mf. Specialised on which inputs exist so the loop has no branches.
template <bool kCfg, bool kNoise>
inline void predict(const float* k, const float* x, const float* u, const float* c, const float* z, float w,
                    float mf, float* __restrict x0, float* __restrict eps, int64_t len) {
  const float px = k[P_X], pm = k[P_M], pz = k[P_Z], qx = k[Q_X], qm = k[Q_M], qz = k[Q_Z];
  for (int64_t i = 0; i < len; ++i) {
    const float m = kCfg ? (u[i] + w * (c[i] - u[i])) * mf : c[i] * mf;
    float x0_raw = px * x[i] + pm * m;
    float e = qx * x[i] + qm * m;
    if (kNoise) {
      x0_raw += pz * z[i];
      e += qz * z[i];
    }
    x0[i] = x0_raw;
    eps[i] = e;
  }
}

FASTGUIDE_TARGET_CLONES
void step_tile(const StepArgs& a, const float* k, int64_t row, int64_t begin, int64_t len, Scratch& s) {
  const float* x = load_row(a, a.sample, a.sample_stride, row, begin, len, s.x);
  const int64_t cond_row = a.has_cfg ? row + a.batch : row;
  const float* cond = load_row(a, a.model_output, a.model_output_stride, cond_row, begin, len, s.cond);

  // One pass: the guided model output m = (u + w (c - u)) * mfactor, then x0_raw and eps from x, m, z.
  const float* u = a.has_cfg ? load_row(a, a.model_output, a.model_output_stride, row, begin, len, s.uncond)
                             : nullptr;
  const float w = a.has_cfg ? a.scale[row * a.scale_stride] : 0.f;
  const float mf = a.mfactor ? a.mfactor[row] : 1.f;  // a missing mfactor is an exact factor of 1
  const float* z = load_row(a, a.noise, a.noise_stride, row, begin, len, s.noise);
  if (u && z) {
    predict<true, true>(k, x, u, cond, z, w, mf, s.x0, s.eps, len);
  } else if (u) {
    predict<true, false>(k, x, u, cond, z, w, mf, s.x0, s.eps, len);
  } else if (z) {
    predict<false, true>(k, x, u, cond, z, w, mf, s.x0, s.eps, len);
  } else {
    predict<false, false>(k, x, u, cond, z, w, mf, s.x0, s.eps, len);
  }
  float* __restrict x0 = s.x0;
  float* __restrict eps = s.eps;

  if (a.clip_mode == kClipRange) {
    const float lo = a.clip_lo, hi = a.clip_hi;
    for (int64_t i = 0; i < len; ++i) {
      const float v = x0[i] < lo ? lo : x0[i];  // NaN passes through, as in torch.clamp
      x0[i] = v > hi ? hi : v;
    }
  } else if (a.clip_mode == kClipThreshold) {
    // Dynamic thresholding with a precomputed per-sample threshold s: clamp(x0, -s, s) / s.
    const float t = a.threshold[row];
    for (int64_t i = 0; i < len; ++i) {
      const float v = x0[i] > t ? t : x0[i];
      x0[i] = (v < -t ? -t : v) / t;
    }
  }

  // The score correction enters after clipping (guided-diffusion's condition_score).
  if (const float* g = load_row(a, a.g_score, a.g_score_stride, row, begin, len, s.g_score)) {
    const float pg = k[P_G], qg = k[Q_G];
    for (int64_t i = 0; i < len; ++i) {
      x0[i] += pg * g[i];
      eps[i] += qg * g[i];
    }
  }

  if (a.out) {
    float* __restrict res = s.res;
    const float ca = k[A], cb = k[B], cc = k[C];
    for (int64_t i = 0; i < len; ++i) res[i] = ca * x[i] + cb * x0[i] + cc * eps[i];

    const float* gm = load_row(a, a.g_mean, a.g_mean_stride, row, begin, len, s.g_mean);
    // Learned-range variance from the cond half: Sigma = exp(f LV_MAX + (1 - f) LV_MIN), f = (v + 1) / 2.
    const float* sigma = nullptr;
    if (a.learned_variance && (gm || z)) {
      const float* v = load_f32(a.dtype, a.model_output, cond_row * a.model_output_stride + a.n + begin, len,
                                s.variance);
      const float lv_max = k[LV_MAX], lv_min = k[LV_MIN];
      float* __restrict var = s.sigma;
      for (int64_t i = 0; i < len; ++i) {
        const float f = (v[i] + 1.f) * 0.5f;
        var[i] = exp_f32(f * lv_max + (1.f - f) * lv_min);
      }
      sigma = s.sigma;
    }
    if (gm) {
      const float d = k[D], dv = k[DV];
      if (sigma) {
        for (int64_t i = 0; i < len; ++i) res[i] += (d + dv * sigma[i]) * gm[i];
      } else {
        for (int64_t i = 0; i < len; ++i) res[i] += d * gm[i];
      }
    }
    if (z) {
      const float e = k[E], ev = k[EV];
      if (sigma) {
        for (int64_t i = 0; i < len; ++i) res[i] += (e + ev * std::sqrt(sigma[i])) * z[i];
      } else {
        for (int64_t i = 0; i < len; ++i) res[i] += e * z[i];
      }
    }
    if (const float* xp = load_row(a, a.x0_prev, a.x0_prev_stride, row, begin, len, s.x0_prev)) {
      const float f = k[F];
      for (int64_t i = 0; i < len; ++i) res[i] += f * xp[i];
    }
  }

  // Every input of this tile has been read; x0_out first so that out wins if both are the same tensor.
  if (a.x0_out) store_f32(a.dtype, a.x0_out, row * a.x0_out_stride + begin, s.x0, len);
  if (a.out) store_f32(a.dtype, a.out, row * a.out_stride + begin, s.res, len);
}

}  // namespace

void guided_step(const StepArgs& args) {
  const int64_t step = args.step_ptr ? *args.step_ptr : args.step;
  const float* coefs = args.table + step * kNumCols;
  for_each_chunk(args.batch, args.n, kTile, [&](int64_t, int64_t row, int64_t begin, int64_t len) {
    Scratch scratch;
    step_tile(args, coefs, row, begin, len, scratch);
  });
}

}  // namespace fastguide::cpu
