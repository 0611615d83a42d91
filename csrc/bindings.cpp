// pybind11 module fastguide._C: the argument blocks of fastguide_abi.h as Python classes, and the kernels.
//
// No libtorch: tensors arrive as raw addresses (tensor.data_ptr(), 0 for "absent") plus strides, filled
// in by fastguide/backends/abi.py. Kernels run with the GIL released; the argument block is copied first, so
// Python may reuse it while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/fastguide_cpu.h"
#include "fastguide_abi.h"
#ifdef FASTGUIDE_WITH_CUDA
#include "cuda/fastguide_cuda.h"
#endif

namespace py = pybind11;
using namespace fastguide;

namespace {

// A read-write Python int property over a pointer field (0 is the null pointer).
template <class Struct, class Ptr>
void def_pointer(py::class_<Struct>& cls, const char* name, Ptr Struct::*field) {
  cls.def_property(
      name, [field](const Struct& s) { return reinterpret_cast<uintptr_t>(s.*field); },
      [field](Struct& s, uintptr_t address) { s.*field = reinterpret_cast<Ptr>(address); });
}

template <class Args>
void def_cpu_kernel(py::module_& m, const char* name, void (*kernel)(const Args&)) {
  m.def(
      name,
      [kernel](Args args) {
        py::gil_scoped_release release;
        kernel(args);
      },
      py::arg("args"));
}

#ifdef FASTGUIDE_WITH_CUDA
template <class Args>
void def_cuda_kernel(py::module_& m, const char* name, void (*kernel)(const Args&, void*)) {
  m.def(
      name,
      [kernel](Args args, uintptr_t stream) {
        py::gil_scoped_release release;
        kernel(args, reinterpret_cast<void*>(stream));
      },
      py::arg("args"), py::arg("stream"));
}
#endif

void bind_guided_step_args(py::module_& m) {
  py::class_<GuidedStepArgs> cls(m, "GuidedStepArgs");
  cls.def(py::init<>())
      .def_readwrite("batch", &GuidedStepArgs::batch)
      .def_readwrite("n", &GuidedStepArgs::n)
      .def_readwrite("dtype", &GuidedStepArgs::dtype)
      .def_readwrite("sample_stride", &GuidedStepArgs::sample_stride)
      .def_readwrite("model_output_stride", &GuidedStepArgs::model_output_stride)
      .def_readwrite("has_cfg", &GuidedStepArgs::has_cfg)
      .def_readwrite("learned_variance", &GuidedStepArgs::learned_variance)
      .def_readwrite("scale_stride", &GuidedStepArgs::scale_stride)
      .def_readwrite("g_score_stride", &GuidedStepArgs::g_score_stride)
      .def_readwrite("g_mean_stride", &GuidedStepArgs::g_mean_stride)
      .def_readwrite("noise_stride", &GuidedStepArgs::noise_stride)
      .def_readwrite("x0_prev_stride", &GuidedStepArgs::x0_prev_stride)
      .def_readwrite("x0_prev2_stride", &GuidedStepArgs::x0_prev2_stride)
      .def_readwrite("clip_mode", &GuidedStepArgs::clip_mode)
      .def_readwrite("clip_lo", &GuidedStepArgs::clip_lo)
      .def_readwrite("clip_hi", &GuidedStepArgs::clip_hi)
      .def_readwrite("step", &GuidedStepArgs::step)
      .def_readwrite("out_stride", &GuidedStepArgs::out_stride)
      .def_readwrite("x0_out_stride", &GuidedStepArgs::x0_out_stride)
      .def_readwrite("out2_stride", &GuidedStepArgs::out2_stride);
  def_pointer(cls, "sample", &GuidedStepArgs::sample);
  def_pointer(cls, "model_output", &GuidedStepArgs::model_output);
  def_pointer(cls, "scale", &GuidedStepArgs::scale);
  def_pointer(cls, "mfactor", &GuidedStepArgs::mfactor);
  def_pointer(cls, "g_score", &GuidedStepArgs::g_score);
  def_pointer(cls, "g_mean", &GuidedStepArgs::g_mean);
  def_pointer(cls, "noise", &GuidedStepArgs::noise);
  def_pointer(cls, "x0_prev", &GuidedStepArgs::x0_prev);
  def_pointer(cls, "x0_prev2", &GuidedStepArgs::x0_prev2);
  def_pointer(cls, "threshold", &GuidedStepArgs::threshold);
  def_pointer(cls, "table", &GuidedStepArgs::table);
  def_pointer(cls, "step_ptr", &GuidedStepArgs::step_ptr);
  def_pointer(cls, "out", &GuidedStepArgs::out);
  def_pointer(cls, "x0_out", &GuidedStepArgs::x0_out);
  def_pointer(cls, "out2", &GuidedStepArgs::out2);
  def_pointer(cls, "step_rows", &GuidedStepArgs::step_rows);
  def_pointer(cls, "uncond_rows", &GuidedStepArgs::uncond_rows);
  def_pointer(cls, "combine", &GuidedStepArgs::combine);
  def_pointer(cls, "extra", &GuidedStepArgs::extra);
  cls.def_readwrite("extra_stride", &GuidedStepArgs::extra_stride)
      .def_readwrite("eps_from_uncond", &GuidedStepArgs::eps_from_uncond);
  // The fields every call sets (and out2), given to the constructor: each property assignment costs a Python ->
  // C++ round trip (~0.3 us), and these are most of a loop step's argument-block time.
  cls.def(py::init([](int64_t batch, int64_t n, int32_t dtype, uintptr_t sample, int64_t sample_stride,
                      uintptr_t model_output, int64_t model_output_stride, int32_t has_cfg, uintptr_t scale,
                      int64_t scale_stride, uintptr_t table, uintptr_t step_ptr, int64_t step, uintptr_t out,
                      int64_t out_stride, uintptr_t out2, int64_t out2_stride) {
            GuidedStepArgs s;
            s.batch = batch;
            s.n = n;
            s.dtype = dtype;
            s.sample = reinterpret_cast<const void*>(sample);
            s.sample_stride = sample_stride;
            s.model_output = reinterpret_cast<const void*>(model_output);
            s.model_output_stride = model_output_stride;
            s.has_cfg = has_cfg;
            s.scale = reinterpret_cast<const float*>(scale);
            s.scale_stride = scale_stride;
            s.table = reinterpret_cast<const float*>(table);
            s.step_ptr = reinterpret_cast<const int64_t*>(step_ptr);
            s.step = step;
            s.out = reinterpret_cast<void*>(out);
            s.out_stride = out_stride;
            s.out2 = reinterpret_cast<void*>(out2);
            s.out2_stride = out2_stride;
            return s;
          }),
          py::arg("batch"), py::arg("n"), py::arg("dtype"), py::arg("sample"), py::arg("sample_stride"),
          py::arg("model_output"), py::arg("model_output_stride"), py::arg("has_cfg"), py::arg("scale"),
          py::arg("scale_stride"), py::arg("table"), py::arg("step_ptr"), py::arg("step"), py::arg("out"),
          py::arg("out_stride"), py::arg("out2") = 0, py::arg("out2_stride") = 0);
}

void bind_cfg_rescale_factor_args(py::module_& m) {
  py::class_<CfgRescaleFactorArgs> cls(m, "CfgRescaleFactorArgs");
  cls.def(py::init<>())
      .def_readwrite("batch", &CfgRescaleFactorArgs::batch)
      .def_readwrite("n", &CfgRescaleFactorArgs::n)
      .def_readwrite("dtype", &CfgRescaleFactorArgs::dtype)
      .def_readwrite("model_output_stride", &CfgRescaleFactorArgs::model_output_stride)
      .def_readwrite("scale_stride", &CfgRescaleFactorArgs::scale_stride)
      .def_readwrite("phi", &CfgRescaleFactorArgs::phi);
  def_pointer(cls, "model_output", &CfgRescaleFactorArgs::model_output);
  def_pointer(cls, "scale", &CfgRescaleFactorArgs::scale);
  def_pointer(cls, "factor", &CfgRescaleFactorArgs::factor);
}

void bind_guidance_gram_args(py::module_& m) {
  py::class_<GuidanceGramArgs> cls(m, "GuidanceGramArgs");
  cls.def(py::init<>())
      .def_readwrite("batch", &GuidanceGramArgs::batch)
      .def_readwrite("n", &GuidanceGramArgs::n)
      .def_readwrite("dtype", &GuidanceGramArgs::dtype)
      .def_readwrite("model_output_stride", &GuidanceGramArgs::model_output_stride)
      .def_readwrite("extra_stride", &GuidanceGramArgs::extra_stride)
      .def_readwrite("has_momentum", &GuidanceGramArgs::has_momentum)
      .def_readwrite("momentum", &GuidanceGramArgs::momentum);
  def_pointer(cls, "model_output", &GuidanceGramArgs::model_output);
  def_pointer(cls, "extra", &GuidanceGramArgs::extra);
  def_pointer(cls, "out", &GuidanceGramArgs::out);
}

void bind_temperature_lse_grad_args(py::module_& m) {
  py::class_<TemperatureLseGradArgs> cls(m, "TemperatureLseGradArgs");
  cls.def(py::init<>())
      .def_readwrite("rows", &TemperatureLseGradArgs::rows)
      .def_readwrite("k", &TemperatureLseGradArgs::k)
      .def_readwrite("dtype", &TemperatureLseGradArgs::dtype)
      .def_readwrite("logits_stride", &TemperatureLseGradArgs::logits_stride)
      .def_readwrite("tau1", &TemperatureLseGradArgs::tau1)
      .def_readwrite("tau2", &TemperatureLseGradArgs::tau2)
      .def_readwrite("out_stride", &TemperatureLseGradArgs::out_stride);
  def_pointer(cls, "logits", &TemperatureLseGradArgs::logits);
  def_pointer(cls, "labels", &TemperatureLseGradArgs::labels);
  def_pointer(cls, "scale", &TemperatureLseGradArgs::scale);
  def_pointer(cls, "out", &TemperatureLseGradArgs::out);
}

void bind_per_sample_rms_args(py::module_& m) {
  py::class_<PerSampleRmsArgs> cls(m, "PerSampleRmsArgs");
  cls.def(py::init<>())
      .def_readwrite("rows", &PerSampleRmsArgs::rows)
      .def_readwrite("n", &PerSampleRmsArgs::n)
      .def_readwrite("dtype", &PerSampleRmsArgs::dtype)
      .def_readwrite("x_stride", &PerSampleRmsArgs::x_stride);
  def_pointer(cls, "x", &PerSampleRmsArgs::x);
  def_pointer(cls, "out", &PerSampleRmsArgs::out);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastguide compiled kernels (C++ CPU, and CUDA C++ when built with CUDA)";
  m.attr("F32") = int(kF32);
  m.attr("F16") = int(kF16);
  m.attr("BF16") = int(kBF16);
  m.attr("NUM_COLS") = kNumCols;
  bind_guided_step_args(m);
  bind_cfg_rescale_factor_args(m);
  bind_temperature_lse_grad_args(m);
  bind_per_sample_rms_args(m);
  bind_guidance_gram_args(m);

  def_cpu_kernel<GuidedStepArgs>(m, "cpu_guided_step", cpu::guided_step);
  // A repeat call of the drop-in's step (fastguide/dropin/repeat.py): a copy of a filled block, pointed at
  // this call's sample, model output, out and x0_out (0: none; contiguous rows, like out) and at its host
  // step index. One call instead of building a new block in Python.
  m.def(
      "cpu_guided_step_at",
      [](const GuidedStepArgs& filled, uintptr_t sample, uintptr_t model_output, uintptr_t out, uintptr_t x0_out,
         int64_t step) {
        GuidedStepArgs args = filled;
        args.sample = reinterpret_cast<const void*>(sample);
        args.model_output = reinterpret_cast<const void*>(model_output);
        args.out = reinterpret_cast<void*>(out);
        args.x0_out = reinterpret_cast<void*>(x0_out);
        args.x0_out_stride = x0_out ? args.n : 0;
        args.step = step;
        py::gil_scoped_release release;
        cpu::guided_step(args);
      },
      py::arg("args"), py::arg("sample"), py::arg("model_output"), py::arg("out"), py::arg("x0_out"),
      py::arg("step"));
  def_cpu_kernel<CfgRescaleFactorArgs>(m, "cpu_cfg_rescale_factor", cpu::cfg_rescale_factor);
  def_cpu_kernel<TemperatureLseGradArgs>(m, "cpu_temperature_lse_grad", cpu::temperature_lse_grad);
  def_cpu_kernel<PerSampleRmsArgs>(m, "cpu_per_sample_rms", cpu::per_sample_rms);
  def_cpu_kernel<GuidanceGramArgs>(m, "cpu_guidance_gram", cpu::guidance_gram);
  m.def("cpu_avx2_conversions", cpu::avx2_conversions,
        "Whether the CPU kernels convert fp16 with F16C and store bf16 with AVX2 (FASTGUIDE_PORTABLE_CONVERSIONS=1 "
        "turns them off).");

#ifdef FASTGUIDE_WITH_CUDA
  def_cuda_kernel<GuidedStepArgs>(m, "cuda_guided_step", cuda::guided_step);
  def_cuda_kernel<CfgRescaleFactorArgs>(m, "cuda_cfg_rescale_factor", cuda::cfg_rescale_factor);
  def_cuda_kernel<TemperatureLseGradArgs>(m, "cuda_temperature_lse_grad", cuda::temperature_lse_grad);
  def_cuda_kernel<PerSampleRmsArgs>(m, "cuda_per_sample_rms", cuda::per_sample_rms);
  def_cuda_kernel<GuidanceGramArgs>(m, "cuda_guidance_gram", cuda::guidance_gram);
  m.def("has_cuda", [] { return true; });
#else
  m.def("has_cuda", [] { return false; });
#endif
}
