// pybind11 module fastguide._C: the argument blocks of fastguide_abi.h as Python classes, and the kernels.
//
// No libtorch: tensors arrive as raw addresses (tensor.data_ptr(), 0 for "absent") plus strides, filled
// in by fastguide/abi.py. Kernels run with the GIL released; the argument block is copied first, so
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

void bind_step_args(py::module_& m) {
  py::class_<StepArgs> cls(m, "StepArgs");
  cls.def(py::init<>())
      .def_readwrite("batch", &StepArgs::batch)
      .def_readwrite("n", &StepArgs::n)
      .def_readwrite("dtype", &StepArgs::dtype)
      .def_readwrite("sample_stride", &StepArgs::sample_stride)
      .def_readwrite("model_output_stride", &StepArgs::model_output_stride)
      .def_readwrite("has_cfg", &StepArgs::has_cfg)
      .def_readwrite("learned_variance", &StepArgs::learned_variance)
      .def_readwrite("scale_stride", &StepArgs::scale_stride)
      .def_readwrite("g_score_stride", &StepArgs::g_score_stride)
      .def_readwrite("g_mean_stride", &StepArgs::g_mean_stride)
      .def_readwrite("noise_stride", &StepArgs::noise_stride)
      .def_readwrite("x0_prev_stride", &StepArgs::x0_prev_stride)
      .def_readwrite("clip_mode", &StepArgs::clip_mode)
      .def_readwrite("clip_lo", &StepArgs::clip_lo)
      .def_readwrite("clip_hi", &StepArgs::clip_hi)
      .def_readwrite("step", &StepArgs::step)
      .def_readwrite("out_stride", &StepArgs::out_stride)
      .def_readwrite("x0_out_stride", &StepArgs::x0_out_stride);
  def_pointer(cls, "sample", &StepArgs::sample);
  def_pointer(cls, "model_output", &StepArgs::model_output);
  def_pointer(cls, "scale", &StepArgs::scale);
  def_pointer(cls, "mfactor", &StepArgs::mfactor);
  def_pointer(cls, "g_score", &StepArgs::g_score);
  def_pointer(cls, "g_mean", &StepArgs::g_mean);
  def_pointer(cls, "noise", &StepArgs::noise);
  def_pointer(cls, "x0_prev", &StepArgs::x0_prev);
  def_pointer(cls, "threshold", &StepArgs::threshold);
  def_pointer(cls, "table", &StepArgs::table);
  def_pointer(cls, "step_ptr", &StepArgs::step_ptr);
  def_pointer(cls, "out", &StepArgs::out);
  def_pointer(cls, "x0_out", &StepArgs::x0_out);
}

void bind_rescale_args(py::module_& m) {
  py::class_<RescaleArgs> cls(m, "RescaleArgs");
  cls.def(py::init<>())
      .def_readwrite("batch", &RescaleArgs::batch)
      .def_readwrite("n", &RescaleArgs::n)
      .def_readwrite("dtype", &RescaleArgs::dtype)
      .def_readwrite("model_output_stride", &RescaleArgs::model_output_stride)
      .def_readwrite("scale_stride", &RescaleArgs::scale_stride)
      .def_readwrite("phi", &RescaleArgs::phi);
  def_pointer(cls, "model_output", &RescaleArgs::model_output);
  def_pointer(cls, "scale", &RescaleArgs::scale);
  def_pointer(cls, "factor", &RescaleArgs::factor);
}

void bind_lse_grad_args(py::module_& m) {
  py::class_<LseGradArgs> cls(m, "LseGradArgs");
  cls.def(py::init<>())
      .def_readwrite("rows", &LseGradArgs::rows)
      .def_readwrite("k", &LseGradArgs::k)
      .def_readwrite("dtype", &LseGradArgs::dtype)
      .def_readwrite("logits_stride", &LseGradArgs::logits_stride)
      .def_readwrite("tau1", &LseGradArgs::tau1)
      .def_readwrite("tau2", &LseGradArgs::tau2)
      .def_readwrite("out_stride", &LseGradArgs::out_stride);
  def_pointer(cls, "logits", &LseGradArgs::logits);
  def_pointer(cls, "labels", &LseGradArgs::labels);
  def_pointer(cls, "scale", &LseGradArgs::scale);
  def_pointer(cls, "out", &LseGradArgs::out);
}

void bind_rms_args(py::module_& m) {
  py::class_<RmsArgs> cls(m, "RmsArgs");
  cls.def(py::init<>())
      .def_readwrite("rows", &RmsArgs::rows)
      .def_readwrite("n", &RmsArgs::n)
      .def_readwrite("dtype", &RmsArgs::dtype)
      .def_readwrite("x_stride", &RmsArgs::x_stride);
  def_pointer(cls, "x", &RmsArgs::x);
  def_pointer(cls, "out", &RmsArgs::out);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastguide compiled kernels (C++ CPU, and CUDA C++ when built with CUDA)";
  m.attr("F32") = int(kF32);
  m.attr("F16") = int(kF16);
  m.attr("BF16") = int(kBF16);
  m.attr("NUM_COLS") = kNumCols;
  bind_step_args(m);
  bind_rescale_args(m);
  bind_lse_grad_args(m);
  bind_rms_args(m);

  def_cpu_kernel<StepArgs>(m, "cpu_guided_step", cpu::guided_step);
  def_cpu_kernel<RescaleArgs>(m, "cpu_cfg_rescale_factor", cpu::cfg_rescale_factor);
  def_cpu_kernel<LseGradArgs>(m, "cpu_temperature_lse_grad", cpu::temperature_lse_grad);
  def_cpu_kernel<RmsArgs>(m, "cpu_per_sample_rms", cpu::per_sample_rms);

#ifdef FASTGUIDE_WITH_CUDA
  def_cuda_kernel<StepArgs>(m, "cuda_guided_step", cuda::guided_step);
  def_cuda_kernel<RescaleArgs>(m, "cuda_cfg_rescale_factor", cuda::cfg_rescale_factor);
  def_cuda_kernel<LseGradArgs>(m, "cuda_temperature_lse_grad", cuda::temperature_lse_grad);
  def_cuda_kernel<RmsArgs>(m, "cuda_per_sample_rms", cuda::per_sample_rms);
  m.def("has_cuda", [] { return true; });
#else
  m.def("has_cuda", [] { return false; });
#endif
}
