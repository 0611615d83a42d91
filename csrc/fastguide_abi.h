// The argument blocks shared by the C++ CPU and CUDA C++ kernels (see fastguide/core/layout.py for the math).
// Every large tensor is passed as a base pointer plus a row stride in elements; elements within a row are
// contiguous. All large tensors of one call share `dtype` (the Python layer casts); coefficients,
// scales and factors are fp32. A null pointer means "absent".
#pragma once
#include <cstdint>

namespace fastguide {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int kNumCols = 19;  // columns of a step row, in the order of fastguide.core.layout.Col
enum Col : int32_t {
  P_X = 0, P_M, P_G, P_Z, Q_X, Q_M, Q_G, Q_Z, A, B, C, D, E, F, DV, EV, LV_MAX, LV_MIN, F2
};
enum ClipMode : int32_t { kClipNone = 0, kClipRange = 1, kClipThreshold = 2 };

struct GuidedStepArgs {
  int64_t batch = 0;            // B: rows of sample / outputs
  int64_t n = 0;                // elements per sample row
  int32_t dtype = kF32;
  const void* sample = nullptr;        int64_t sample_stride = 0;
  const void* model_output = nullptr;  int64_t model_output_stride = 0;
  int32_t has_cfg = 0;                 // model_output has 2B rows [uncond; cond]
  int32_t learned_variance = 0;        // each model_output row holds [prediction (n) | variance v (n)]
  const float* scale = nullptr;        int64_t scale_stride = 0;  // [B] guidance scale (stride 0: scalar)
  const float* mfactor = nullptr;      // [B] CFG-rescale factor, or null
  const void* g_score = nullptr;       int64_t g_score_stride = 0;
  const void* g_mean = nullptr;        int64_t g_mean_stride = 0;
  const void* noise = nullptr;         int64_t noise_stride = 0;
  const void* x0_prev = nullptr;       int64_t x0_prev_stride = 0;
  const void* x0_prev2 = nullptr;      int64_t x0_prev2_stride = 0;  // coefficient F2
  int32_t clip_mode = kClipNone;
  float clip_lo = -1.f, clip_hi = 1.f;
  const float* threshold = nullptr;    // [B] when clip_mode == kClipThreshold
  const float* table = nullptr;        // [steps, kNumCols], contiguous fp32, same device as the data
  const int64_t* step_ptr = nullptr;   // if set, the step index is read from here (device memory on CUDA)
  int64_t step = 0;                    // otherwise this step index is used
  void* out = nullptr;                 int64_t out_stride = 0;    // null: do not write out
  void* x0_out = nullptr;              int64_t x0_out_stride = 0; // null: do not write x0
  // A second destination of the result, stored in the same pass as out (a loop's next [x; x] model
  // input); written only when out is. Store order x0_out, out, out2: an output that is x0_out too holds
  // the result.
  void* out2 = nullptr;                int64_t out2_stride = 0;   // null: no second copy
  // Heterogeneous batches (fastguide.core.args.StepArgs): every sample at its own step of its own table.
  // step_rows[b] is sample b's row of `table` (overriding step_ptr / step). With has_cfg, uncond_rows makes
  // the CFG batch sparse: sample b's cond prediction is row b of model_output and its uncond prediction
  // row uncond_rows[b], or none when that is negative (then m = c exactly, whatever the scale).
  const int64_t* step_rows = nullptr;    // [B] int64, or null
  const int64_t* uncond_rows = nullptr;  // [B] int64, or null ([uncond; cond] layout)
  // Guidance methods beyond CFG (fastguide.guidance.modern): with combine (dense [uncond; cond] layout, has_cfg
  // set, scale null) the guided prediction is m = a c + b u + d e with (a, b, d) = combine[3 b .. 3 b + 2]; the
  // d term only when extra is set. eps_from_uncond: eps~ from u (unscaled), x0^ from m (CFG++).
  const float* combine = nullptr;      // [B, 3] fp32 contiguous, or null
  const void* extra = nullptr;         int64_t extra_stride = 0;  // e, the sample's shape, or null
  int32_t eps_from_uncond = 0;
};

// Per-sample inner products and sums of cond c, uncond u (model_output [uncond; cond], first n elements of a
// row) and extra e: out[9 b ..] = c.c, c.u, u.u, c.e, u.e, e.e, sum c, sum u, sum e (e terms 0 without extra).
// With has_momentum, extra is first updated in place: e = (c - u) + momentum e (stored in dtype), and the
// products use the stored e.
struct GuidanceGramArgs {
  int64_t batch = 0, n = 0;
  int32_t dtype = kF32;
  const void* model_output = nullptr;  int64_t model_output_stride = 0;  // 2B rows
  void* extra = nullptr;               int64_t extra_stride = 0;         // B rows, or null
  int32_t has_momentum = 0;
  float momentum = 0.f;
  float* out = nullptr;                // [B, 9] fp32
};

// Per-sample factor r_b = phi * std(cond_b) / std(guided_b) + (1 - phi), unbiased std (diffusers'
// rescale_noise_cfg); guided = u + w_b (c - u). Only the first n elements of a row (the prediction).
struct CfgRescaleFactorArgs {
  int64_t batch = 0, n = 0;
  int32_t dtype = kF32;
  const void* model_output = nullptr;  int64_t model_output_stride = 0;  // 2B rows
  const float* scale = nullptr;        int64_t scale_stride = 0;
  float phi = 0.f;
  float* factor = nullptr;             // [B] fp32 output
};

// d/dl [tau1 * l_y - logsumexp(tau2 * l)] = tau1 * onehot(y) - tau2 * softmax(tau2 * l), times scale_b.
struct TemperatureLseGradArgs {
  int64_t rows = 0, k = 0;
  int32_t dtype = kF32;                // of logits and out
  const void* logits = nullptr;        int64_t logits_stride = 0;
  const int64_t* labels = nullptr;     // [rows] int64
  float tau1 = 1.f, tau2 = 1.f;
  const float* scale = nullptr;        // [rows] or null
  void* out = nullptr;                 int64_t out_stride = 0;
};

// sqrt(mean(x^2)) per row, fp32 output.
struct PerSampleRmsArgs {
  int64_t rows = 0, n = 0;
  int32_t dtype = kF32;
  const void* x = nullptr;             int64_t x_stride = 0;
  float* out = nullptr;
};

}  // namespace fastguide
