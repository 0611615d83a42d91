// C++ CPU kernels of the fused ops (fastguide/core/layout.py defines the math, fastguide/backends/reference.py the
// semantics). Arguments are the raw-pointer blocks of csrc/fastguide_abi.h, already validated by
// fastguide.core.ops; every call is synchronous and parallelised with OpenMP.
#pragma once
#include "../fastguide_abi.h"

namespace fastguide::cpu {

// One fused guided sampler step: writes args.out and/or args.x0_out. Outputs may alias inputs exactly.
void guided_step(const GuidedStepArgs& args);

// Per-sample CFG-rescale factor into args.factor.
void cfg_rescale_factor(const CfgRescaleFactorArgs& args);

// Per-sample inner products of cond, uncond and extra (guidance_gram.cpp / .cu).
void guidance_gram(const GuidanceGramArgs& args);

// tau1 * onehot(y) - tau2 * softmax(tau2 * l), times the per-row scale, into args.out.
void temperature_lse_grad(const TemperatureLseGradArgs& args);

// sqrt(mean(x^2)) per row into args.out.
void per_sample_rms(const PerSampleRmsArgs& args);

// Whether fp16 / bf16 storage is converted with F16C / AVX2 here (else by the portable loops; storage.h).
bool avx2_conversions();

}  // namespace fastguide::cpu
