// Fused guided sampler step on the CPU: the row formula of fastguide/core/layout.py, one tile at a time.
//
// A work item is one tile of one sample row; inputs are read as fp32 (converted into scratch when stored
// as fp16/bf16). Terms that only add to the output (mean shift, noise, x0_prev, x0_prev2) are first summed
// into an L1 buffer. In the common case (no clipping, no score term) one loop then computes the
// guided model output and applies the row's folded x / m / z coefficients in registers; otherwise x0 and eps
// go through L1 buffers so that clipping and the score term can change them. Optional terms are branches
// around whole loops, never multiplications by zero, so an absent tensor cannot inject NaN.
//
// Guidance beyond CFG: with `combine` the tile's guided prediction m = (a c + b u [+ d e]) mf is first formed in
// an L1 buffer, and the loops above then take it as a non-CFG cond prediction with an exact factor 1. With
// `eps_from_uncond` (CFG++) eps uses the unscaled uncond prediction u in place of m (kEpsU), x0 still m.
// Both are picked once per tile; the common case runs the same loops as without them.
//
// Aliasing: an output may be one of the inputs exactly (out=sample). The loop that writes `out` (and `out2`,
// the optional second copy of the result, in the same loop) reads every input of element i before writing
// element i (hence `omp simd` rather than the compiler's overlap checks), no input is read after it, and
// x0_out is written last; when x0_out is the same tensor as out or out2 it holds the result, as in the
// reference.
#include <cmath>

#include "fast_exp.h"
#include "fastguide_cpu.h"
#include "parallel.h"
#include "simd.h"
#include "storage.h"

namespace fastguide::cpu {
namespace {

constexpr int64_t kTile = 4096;  // elements per work item (16 KiB of fp32 per stream): per-tile setup stays small

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
  alignas(64) float x0_prev2[kTile];
  alignas(64) float e[kTile];  // the combine's third prediction (extra)
  // Intermediates; `res` holds the output before conversion when it is not stored as fp32.
  alignas(64) float x0[kTile];
  alignas(64) float eps[kTile];
  alignas(64) float sigma[kTile];
  alignas(64) float extra[kTile];
  alignas(64) float res[kTile];
  alignas(64) float m[kTile];  // the combine's guided prediction
};

// The tile's model-side inputs: sample x, uncond u (CFG, or the eps source with kEpsU), cond c, noise z,
// scale w, rescale factor mf.
struct Model {
  const float* x;
  const float* u;
  const float* c;
  const float* z;
  float w, mf;
};

// Guided model output (u + w (c - u)) * mf with CFG, else c * mf; a missing mfactor is an exact 1.
template <bool kCfg>
inline float guided(const Model& in, int64_t i) {
  return kCfg ? (in.u[i] + in.w * (in.c[i] - in.u[i])) * in.mf : in.c[i] * in.mf;
}

// x0_raw = P_X x + P_M m + P_Z z and eps = Q_X x + Q_M m + Q_Z z into L1 buffers (Q_M u with kEpsU).
template <bool kCfg, bool kNoise, bool kEpsU>
inline void predict(const float* k, const Model& in, float* __restrict x0, float* __restrict eps, int64_t len) {
  const float px = k[P_X], pm = k[P_M], pz = k[P_Z], qx = k[Q_X], qm = k[Q_M], qz = k[Q_Z];
  for (int64_t i = 0; i < len; ++i) {
    const float m = guided<kCfg>(in, i);
    float x0_raw = px * in.x[i] + pm * m;
    float e = qx * in.x[i] + qm * (kEpsU ? in.u[i] : m);
    if (kNoise) {
      x0_raw += pz * in.z[i];
      e += qz * in.z[i];
    }
    x0[i] = x0_raw;
    eps[i] = e;
  }
}

// out = A x + B x0 + C eps (+ extra), the whole step in one loop, storing to out2 too when kOut2 (fp32
// storage). Without clipping or a score term x0 and eps are linear in (x, m, z), so the row folds (in double,
// once per tile) into out = fx x + fm m + fz z: 4 vector ops per element instead of 9, which is what bounds a
// cache-resident step. An absent or non-finite coefficient propagates exactly as in the unfolded form
// (0 * inf is NaN in both). eps from u (kEpsU) keeps the unfolded loop.
template <bool kCfg, bool kNoise, bool kExtra, bool kOut2, bool kEpsU>
inline void fused_loop(const float* k, const Model& in, const float* extra, float* out, float* out2,
                       int64_t len) {
  if constexpr (!kEpsU) {
    const double ca = k[A], cb = k[B], cc = k[C];
    const float fx = float(ca + cb * k[P_X] + cc * k[Q_X]);
    const float fm = float(cb * k[P_M] + cc * k[Q_M]);
    const float fz = kNoise ? float(cb * k[P_Z] + cc * k[Q_Z]) : 0.f;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      float r = fx * in.x[i] + fm * guided<kCfg>(in, i);
      if (kNoise) r += fz * in.z[i];
      if (kExtra) r += extra[i];
      out[i] = r;
      if (kOut2) out2[i] = r;
    }
    return;
  }
  const float px = k[P_X], pm = k[P_M], pz = k[P_Z], qx = k[Q_X], qm = k[Q_M], qz = k[Q_Z];
  const float ca = k[A], cb = k[B], cc = k[C];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float m = guided<kCfg>(in, i);
    float x0 = px * in.x[i] + pm * m;
    float e = qx * in.x[i] + qm * (kEpsU ? in.u[i] : m);
    if (kNoise) {
      x0 += pz * in.z[i];
      e += qz * in.z[i];
    }
    float r = ca * in.x[i] + cb * x0 + cc * e;
    if (kExtra) r += extra[i];
    out[i] = r;
    if (kOut2) out2[i] = r;
  }
}

// out = A x + B x0 + C eps (+ extra) from the x0 and eps buffers (and out2, when kOut2).
template <bool kExtra, bool kOut2>
inline void combine_loop(const float* k, const float* x, const float* x0, const float* eps,
                         const float* extra, float* out, float* out2, int64_t len) {
  const float ca = k[A], cb = k[B], cc = k[C];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    float r = ca * x[i] + cb * x0[i] + cc * eps[i];
    if (kExtra) r += extra[i];
    out[i] = r;
    if (kOut2) out2[i] = r;
  }
}

// The loops above with or without the second store, picked once per tile.
template <bool kCfg, bool kNoise, bool kExtra, bool kEpsU>
inline void predict_and_combine(const float* k, const Model& in, const float* extra, float* out, float* out2,
                                int64_t len) {
  if (out2) {
    fused_loop<kCfg, kNoise, kExtra, true, kEpsU>(k, in, extra, out, out2, len);
  } else {
    fused_loop<kCfg, kNoise, kExtra, false, kEpsU>(k, in, extra, out, nullptr, len);
  }
}

// The combine's guided prediction m = (a c + b u [+ d e]) mf into an L1 buffer, summed in the reference's
// order ((a c + b u) + d e) mf; the factor only when there is one (mf = 1 would be exact anyway).
template <bool kE, bool kMf>
inline void linear_combine(const float* coef, float mf, const float* c, const float* u, const float* e,
                           float* __restrict m, int64_t len) {
  const float ka = coef[0], kb = coef[1], kd = coef[2];
  for (int64_t i = 0; i < len; ++i) {
    float r = ka * c[i] + kb * u[i];
    if (kE) r += kd * e[i];
    if (kMf) r *= mf;
    m[i] = r;
  }
}

template <bool kExtra>
inline void combine(const float* k, const float* x, const float* x0, const float* eps, const float* extra,
                    float* out, float* out2, int64_t len) {
  if (out2) {
    combine_loop<kExtra, true>(k, x, x0, eps, extra, out, out2, len);
  } else {
    combine_loop<kExtra, false>(k, x, x0, eps, extra, out, nullptr, len);
  }
}

const float* load_row(const GuidedStepArgs& a, const void* base, int64_t stride, int64_t row, int64_t begin,
                      int64_t len, float* buf) {
  return base ? load_f32(a.dtype, base, row * stride + begin, len, buf) : nullptr;
}

// Sum of the terms that only add to the output, (D + DV Sigma) gm + (E + EV sqrt(Sigma)) z + F x0_prev
// + F2 x0_prev2, into s.extra (in the reference's order); null when there are none. Each is skipped when its
// input is absent, so a NaN coefficient of a missing term never reaches the output. Sigma = exp(f LV_MAX +
// (1 - f) LV_MIN), f = (v + 1) / 2, from the cond half's learned-range variance channels v.
const float* added_terms(const GuidedStepArgs& a, const float* k, const Model& in, int64_t row,
                         int64_t cond_row, int64_t begin, int64_t len, Scratch& s) {
  const float* gm = load_row(a, a.g_mean, a.g_mean_stride, row, begin, len, s.g_mean);
  const float* xp = load_row(a, a.x0_prev, a.x0_prev_stride, row, begin, len, s.x0_prev);
  const float* xp2 = load_row(a, a.x0_prev2, a.x0_prev2_stride, row, begin, len, s.x0_prev2);
  const float* z = in.z;
  if (!gm && !z && !xp && !xp2) return nullptr;
  float* __restrict extra = s.extra;
  for (int64_t i = 0; i < len; ++i) extra[i] = 0.f;
  const float* sigma = nullptr;
  if (a.learned_variance && (gm || z)) {
    const float* v =
        load_f32(a.dtype, a.model_output, cond_row * a.model_output_stride + a.n + begin, len, s.variance);
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
      for (int64_t i = 0; i < len; ++i) extra[i] += (d + dv * sigma[i]) * gm[i];
    } else {
      for (int64_t i = 0; i < len; ++i) extra[i] += d * gm[i];
    }
  }
  if (z) {
    const float e = k[E], ev = k[EV];
    if (sigma) {
      for (int64_t i = 0; i < len; ++i) extra[i] += (e + ev * std::sqrt(sigma[i])) * z[i];
    } else {
      for (int64_t i = 0; i < len; ++i) extra[i] += e * z[i];
    }
  }
  if (xp) {
    const float f = k[F];
    for (int64_t i = 0; i < len; ++i) extra[i] += f * xp[i];
  }
  if (xp2) {
    const float f2 = k[F2];
    for (int64_t i = 0; i < len; ++i) extra[i] += f2 * xp2[i];
  }
  return s.extra;
}

void clip_x0(const GuidedStepArgs& a, int64_t row, float* __restrict x0, int64_t len) {
  if (a.clip_mode == kClipRange) {
    const float lo = a.clip_lo, hi = a.clip_hi;
    for (int64_t i = 0; i < len; ++i) {
      const float v = x0[i] < lo ? lo : x0[i];  // NaN passes through, as in torch.clamp
      x0[i] = v > hi ? hi : v;
    }
  } else if (a.clip_mode == kClipThreshold) {
    // Dynamic thresholding with a precomputed per-sample threshold t: clamp(x0, -t, t) / t.
    const float t = a.threshold[row];
    for (int64_t i = 0; i < len; ++i) {
      const float v = x0[i] > t ? t : x0[i];
      x0[i] = (v < -t ? -t : v) / t;
    }
  }
}

FASTGUIDE_TARGET_CLONES
void step_tile(const GuidedStepArgs& a, const float* k, int64_t row, int64_t begin, int64_t len, Scratch& s) {
  // The row's model output rows, chosen once per tile: dense CFG [uncond; cond] (uncond row b, cond row
  // B + b), a sparse CFG batch (cond row b, uncond row uncond_rows[b] or none), or no CFG (row b).
  // A sample without an uncond row takes the non-CFG variant: m = c exactly, its scale is never read.
  int64_t cond_row = row, uncond_row = -1;
  if (a.has_cfg) {
    if (a.uncond_rows) {
      uncond_row = a.uncond_rows[row];
    } else {
      cond_row = row + a.batch;
      uncond_row = row;
    }
  }
  const bool has_u = uncond_row >= 0;
  Model in;
  in.x = load_row(a, a.sample, a.sample_stride, row, begin, len, s.x);
  in.c = load_row(a, a.model_output, a.model_output_stride, cond_row, begin, len, s.cond);
  in.u = has_u ? load_row(a, a.model_output, a.model_output_stride, uncond_row, begin, len, s.uncond) : nullptr;
  in.z = load_row(a, a.noise, a.noise_stride, row, begin, len, s.noise);
  in.mf = a.mfactor ? a.mfactor[row] : 1.f;
  // CFG u + w (c - u) in the loops, or (combine) m formed here and passed on as a cond prediction with
  // factor 1, so that the loops below are those of the plain step.
  bool cfg = has_u;
  if (a.combine) {
    const float* coef = a.combine + 3 * row;
    const float* e = load_row(a, a.extra, a.extra_stride, row, begin, len, s.e);
    const bool mf = a.mfactor != nullptr;
    if (e && mf) {
      linear_combine<true, true>(coef, in.mf, in.c, in.u, e, s.m, len);
    } else if (e) {
      linear_combine<true, false>(coef, in.mf, in.c, in.u, e, s.m, len);
    } else if (mf) {
      linear_combine<false, true>(coef, in.mf, in.c, in.u, e, s.m, len);
    } else {
      linear_combine<false, false>(coef, in.mf, in.c, in.u, e, s.m, len);
    }
    in.c = s.m;
    in.mf = 1.f;
    cfg = false;
  }
  in.w = cfg ? a.scale[row * a.scale_stride] : 0.f;
  // CFG++: eps from the uncond prediction; a sparse batch's sample without one uses its cond prediction
  // (the reference's fallback row), unscaled.
  const bool eps_u = a.eps_from_uncond != 0;
  if (eps_u && !in.u) in.u = in.c;  // no combine here: in.c is still the cond prediction
  const int variant = (eps_u ? 4 : 0) | (cfg ? 2 : 0) | (in.z ? 1 : 0);

  const float* extra = a.out ? added_terms(a, k, in, row, cond_row, begin, len, s) : nullptr;
  // fp32 outputs are written in place (out2 in the same loop); others go through s.res and are converted.
  const bool f32_out = a.dtype == kF32 && a.out;
  float* out = f32_out ? static_cast<float*>(a.out) + row * a.out_stride + begin : s.res;
  float* out2 = f32_out && a.out2 ? static_cast<float*>(a.out2) + row * a.out2_stride + begin : nullptr;

  // The folded loop also serves calls that want x0 (computed first, into s.x0, before out may overwrite an
  // input it aliases), so asking for x0 never changes the result's rounding; CFG++ with x0 takes the buffers.
  if (a.out && a.clip_mode == kClipNone && !a.g_score && (!a.x0_out || !eps_u)) {
    if (a.x0_out) {  // (predict's eps goes unused here)
      switch (variant & 3) {  // bits: 2 kCfg, 1 kNoise
        case 0: predict<false, false, false>(k, in, s.x0, s.eps, len); break;
        case 1: predict<false, true, false>(k, in, s.x0, s.eps, len); break;
        case 2: predict<true, false, false>(k, in, s.x0, s.eps, len); break;
        default: predict<true, true, false>(k, in, s.x0, s.eps, len); break;
      }
    }
    // Bits of the case: 8 kEpsU, 4 kCfg, 2 kNoise, 1 kExtra.
    switch (variant * 2 + (extra ? 1 : 0)) {
      case 0: predict_and_combine<false, false, false, false>(k, in, extra, out, out2, len); break;
      case 1: predict_and_combine<false, false, true, false>(k, in, extra, out, out2, len); break;
      case 2: predict_and_combine<false, true, false, false>(k, in, extra, out, out2, len); break;
      case 3: predict_and_combine<false, true, true, false>(k, in, extra, out, out2, len); break;
      case 4: predict_and_combine<true, false, false, false>(k, in, extra, out, out2, len); break;
      case 5: predict_and_combine<true, false, true, false>(k, in, extra, out, out2, len); break;
      case 6: predict_and_combine<true, true, false, false>(k, in, extra, out, out2, len); break;
      case 7: predict_and_combine<true, true, true, false>(k, in, extra, out, out2, len); break;
      case 8: predict_and_combine<false, false, false, true>(k, in, extra, out, out2, len); break;
      case 9: predict_and_combine<false, false, true, true>(k, in, extra, out, out2, len); break;
      case 10: predict_and_combine<false, true, false, true>(k, in, extra, out, out2, len); break;
      case 11: predict_and_combine<false, true, true, true>(k, in, extra, out, out2, len); break;
      case 12: predict_and_combine<true, false, false, true>(k, in, extra, out, out2, len); break;
      case 13: predict_and_combine<true, false, true, true>(k, in, extra, out, out2, len); break;
      case 14: predict_and_combine<true, true, false, true>(k, in, extra, out, out2, len); break;
      default: predict_and_combine<true, true, true, true>(k, in, extra, out, out2, len); break;
    }
  } else {
    // Bits of the case: 4 kEpsU, 2 kCfg, 1 kNoise.
    switch (variant) {
      case 0: predict<false, false, false>(k, in, s.x0, s.eps, len); break;
      case 1: predict<false, true, false>(k, in, s.x0, s.eps, len); break;
      case 2: predict<true, false, false>(k, in, s.x0, s.eps, len); break;
      case 3: predict<true, true, false>(k, in, s.x0, s.eps, len); break;
      case 4: predict<false, false, true>(k, in, s.x0, s.eps, len); break;
      case 5: predict<false, true, true>(k, in, s.x0, s.eps, len); break;
      case 6: predict<true, false, true>(k, in, s.x0, s.eps, len); break;
      default: predict<true, true, true>(k, in, s.x0, s.eps, len); break;
    }
    clip_x0(a, row, s.x0, len);
    // The score correction enters after clipping (guided-diffusion's condition_score).
    if (const float* g = load_row(a, a.g_score, a.g_score_stride, row, begin, len, s.g_score)) {
      const float pg = k[P_G], qg = k[Q_G];
      float* __restrict x0 = s.x0;
      float* __restrict eps = s.eps;
      for (int64_t i = 0; i < len; ++i) {
        x0[i] += pg * g[i];
        eps[i] += qg * g[i];
      }
    }
    if (a.out) {
      if (extra) {
        combine<true>(k, in.x, s.x0, s.eps, extra, out, out2, len);
      } else {
        combine<false>(k, in.x, s.x0, s.eps, extra, out, out2, len);
      }
    }
  }
  if (a.out && a.dtype != kF32) {
    store_f32(a.dtype, a.out, row * a.out_stride + begin, s.res, len);
    if (a.out2) store_f32(a.dtype, a.out2, row * a.out2_stride + begin, s.res, len);
  }
  if (a.x0_out && a.x0_out != a.out && !(a.out && a.x0_out == a.out2)) {
    store_f32(a.dtype, a.x0_out, row * a.x0_out_stride + begin, s.x0, len);
  }
}

}  // namespace

void guided_step(const GuidedStepArgs& args) {
  if (args.step_rows) {
    // Heterogeneous batch: every sample at its own row of the table, looked up once per tile.
    const int64_t* rows = args.step_rows;
    for_each_chunk(args.batch, args.n, kTile, [&](int64_t, int64_t row, int64_t begin, int64_t len) {
      Scratch scratch;
      step_tile(args, args.table + rows[row] * kNumCols, row, begin, len, scratch);
    });
    return;
  }
  const int64_t step = args.step_ptr ? *args.step_ptr : args.step;
  const float* coefs = args.table + step * kNumCols;
  for_each_chunk(args.batch, args.n, kTile, [&](int64_t, int64_t row, int64_t begin, int64_t len) {
    Scratch scratch;
    step_tile(args, coefs, row, begin, len, scratch);
  });
}

}  // namespace fastguide::cpu
