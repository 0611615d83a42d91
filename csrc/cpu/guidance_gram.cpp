// Per-sample inner products and sums of cond c, uncond u and extra e on the CPU (the guidance_gram pre-pass of
// fastguide.guidance.modern): out[9 b ..] = c.c, c.u, u.u, c.e, u.e, e.e, sum c, sum u, sum e over the first n
// elements of sample b's rows (model_output [uncond; cond]); the e terms are 0 without extra.
//
// One pass over the data, as in cfg_rescale_factor.cpp: each (row, chunk) item sums every tile of 1024
// elements in fp32 (the vector lanes' partial sums, 128 terms each with AVX2), adds the tile sums up in double,
// and the chunk partials of a row are added up afterwards. Measured at 2 x 16384 elements against the fp64
// reference: at most ~1e-7 of the row's largest column, and 2.5x faster than summing in double throughout
// (9 double accumulators make the loop compute-bound: four lanes and a conversion per operand). With a
// momentum, each tile of e is first updated in place, e = (c - u) + momentum e, stored in the storage dtype,
// and the products use the stored values (read back after rounding), as the reference does.
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

struct Gram {
  double cc = 0, cu = 0, uu = 0, ce = 0, ue = 0, ee = 0, sc = 0, su = 0, se = 0;
};

// The sums of one tile (at most kTile elements) in fp32, added to acc in double.
FASTGUIDE_TARGET_CLONES
void tile_gram(const float* c, const float* u, int64_t len, Gram& acc) {
  float cc = 0, cu = 0, uu = 0, sc = 0, su = 0;
#pragma omp simd reduction(+ : cc, cu, uu, sc, su)
  for (int64_t i = 0; i < len; ++i) {
    const float dc = c[i], du = u[i];
    cc += dc * dc;
    cu += dc * du;
    uu += du * du;
    sc += dc;
    su += du;
  }
  acc.cc += cc;
  acc.cu += cu;
  acc.uu += uu;
  acc.sc += sc;
  acc.su += su;
}

FASTGUIDE_TARGET_CLONES
void tile_gram_extra(const float* c, const float* u, const float* e, int64_t len, Gram& acc) {
  float cc = 0, cu = 0, uu = 0, ce = 0, ue = 0, ee = 0, sc = 0, su = 0, se = 0;
#pragma omp simd reduction(+ : cc, cu, uu, ce, ue, ee, sc, su, se)
  for (int64_t i = 0; i < len; ++i) {
    const float dc = c[i], du = u[i], de = e[i];
    cc += dc * dc;
    cu += dc * du;
    uu += du * du;
    ce += dc * de;
    ue += du * de;
    ee += de * de;
    sc += dc;
    su += du;
    se += de;
  }
  acc.cc += cc;
  acc.cu += cu;
  acc.uu += uu;
  acc.ce += ce;
  acc.ue += ue;
  acc.ee += ee;
  acc.sc += sc;
  acc.su += su;
  acc.se += se;
}

// e = (c - u) + momentum e in fp32 (the reference's order), into `dst` (may be e itself).
FASTGUIDE_TARGET_CLONES
void tile_momentum(const float* c, const float* u, const float* e, float momentum, float* dst, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) dst[i] = (c[i] - u[i]) + momentum * e[i];
}

}  // namespace

void guidance_gram(const GuidanceGramArgs& a) {
  const int64_t per_row = chunks_per_row(a.n, kChunk);
  std::vector<Gram> partial(size_t(a.batch * per_row));
  for_each_chunk(a.batch, a.n, kChunk, [&](int64_t item, int64_t row, int64_t begin, int64_t len) {
    const int64_t cond_row = row + a.batch;
    alignas(64) float ubuf[kTile];
    alignas(64) float cbuf[kTile];
    alignas(64) float ebuf[kTile];
    Gram acc;
    for (int64_t t = begin; t < begin + len; t += kTile) {
      const int64_t tl = std::min(kTile, begin + len - t);
      const float* u = load_f32(a.dtype, a.model_output, row * a.model_output_stride + t, tl, ubuf);
      const float* c = load_f32(a.dtype, a.model_output, cond_row * a.model_output_stride + t, tl, cbuf);
      if (!a.extra) {
        tile_gram(c, u, tl, acc);
        continue;
      }
      const int64_t offset = row * a.extra_stride + t;
      const float* e = load_f32(a.dtype, a.extra, offset, tl, ebuf);
      if (a.has_momentum) {
        if (a.dtype == kF32) {
          float* dst = static_cast<float*>(a.extra) + offset;  // in place; e is this same memory
          tile_momentum(c, u, e, a.momentum, dst, tl);
        } else {
          tile_momentum(c, u, e, a.momentum, ebuf, tl);
          store_f32(a.dtype, a.extra, offset, ebuf, tl);
          e = load_f32(a.dtype, a.extra, offset, tl, ebuf);  // the stored (rounded) values
        }
      }
      tile_gram_extra(c, u, e, tl, acc);
    }
    partial[size_t(item)] = acc;
  });
  for (int64_t row = 0; row < a.batch; ++row) {
    Gram t;
    for (int64_t j = 0; j < per_row; ++j) {
      const Gram& p = partial[size_t(row * per_row + j)];
      t.cc += p.cc;
      t.cu += p.cu;
      t.uu += p.uu;
      t.ce += p.ce;
      t.ue += p.ue;
      t.ee += p.ee;
      t.sc += p.sc;
      t.su += p.su;
      t.se += p.se;
    }
    float* o = a.out + 9 * row;
    const double v[9] = {t.cc, t.cu, t.uu, t.ce, t.ue, t.ee, t.sc, t.su, t.se};
    for (int j = 0; j < 9; ++j) o[j] = float(v[j]);
  }
}

}  // namespace fastguide::cpu
