"""Host emulation of the CUDA features csrc/cuda uses, to run the CUDA C++ kernels' logic on a CPU
(tests/test_backends_cuda_emulated.py): shim headers (include/), the runtime (emu_runtime.cpp), the build helper
(build.py), the Python driver (emulator.py) and kernels that test the emulation itself (selftest.cu)."""
