// Host entry points of the CUDA C++ kernels. Plain C++ (no CUDA headers) so the pybind11 bindings can
// include it with any compiler. `stream` is a cudaStream_t; every call is asynchronous on that stream,
// launches on the current device, and throws std::runtime_error when the launch fails.
// Arguments are assumed validated by the Python ops layer (fastguide.core.ops); see fastguide_abi.h.
#pragma once
#include "../fastguide_abi.h"

namespace fastguide::cuda {

// One fused guided sampler step (the row formula of fastguide/core/layout.py).
void guided_step(const GuidedStepArgs& args, void* stream);

// Per-sample CFG-rescale factor phi * std(cond) / std(guided) + (1 - phi).
void cfg_rescale_factor(const CfgRescaleFactorArgs& args, void* stream);

// Per-sample inner products of cond, uncond and extra (guidance_gram.cpp / .cu).
void guidance_gram(const GuidanceGramArgs& args, void* stream);

// tau1 * onehot(y) - tau2 * softmax(tau2 * logits), times a per-row scale.
void temperature_lse_grad(const TemperatureLseGradArgs& args, void* stream);

// sqrt(mean(x^2)) per row.
void per_sample_rms(const PerSampleRmsArgs& args, void* stream);

}  // namespace fastguide::cuda
