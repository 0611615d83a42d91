// Kernels that check the emulation itself (tests/test_backends_cuda_emulated.py::test_emulator_*): that shuffles move
// the right values, that barriers and clusters order threads, and that each fault the emulator promises to
// catch (out-of-bounds and read-only accesses, misaligned vector loads, array overruns, barriers not reached
// by every thread, bad launch configurations) does fail. Built into the emulated module like csrc/cuda
// (launches and __shared__ rewritten, same sanitizers); called through ctypes.
//
// Each entry point returns the launch's cudaError_t (from cudaGetLastError or cudaLaunchKernelEx), or -1
// with the fault message in `msg` when the kernel faulted.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>

namespace {

__global__ void shuffle_kernel(int* out, int kind, int arg, int width) {
  const int value = 100 + int(threadIdx.x);
  int r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(0xffffffffu, value, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, value, unsigned(arg), width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, value, unsigned(arg), width); break;
    default: r = __shfl_xor_sync(0xffffffffu, value, arg, width); break;
  }
  out[threadIdx.x] = r;
}

// out[t] = x[(t + 1) % n] through shared memory, with or without the barrier that makes it correct.
__global__ void neighbour_kernel(const float* x, float* out, int barrier) {
  __shared__ float s[256];
  const unsigned t = threadIdx.x;
  s[t] = x[t];
  if (barrier) __syncthreads();
  out[t] = s[(t + 1) % blockDim.x];
}

// out[t] = x[t + shift] (reads past the end for shift > 0), or writes into x when write_input is set.
__global__ void offset_kernel(float* x, float* out, int shift, int write_input) {
  const unsigned t = threadIdx.x;
  if (write_input) x[t] = 0.f;
  out[t] = x[t + shift];
}

// A 16-byte load from x + offset elements.
__global__ void vector_load_kernel(const float* x, float* out, int offset) {
  const uint4 v = *reinterpret_cast<const uint4*>(x + offset);
  out[0] = __uint_as_float(v.x);
}

// A local array indexed past its end.
__global__ void local_array_kernel(float* out, int index) {
  float a[4] = {1.f, 2.f, 3.f, 4.f};
  out[0] = a[index];
}

// Threads at or above `active` return before the barrier.
__global__ void early_exit_kernel(float* out, unsigned active) {
  if (threadIdx.x >= active) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Each block of a cluster publishes its rank; out[block] = the rank read from the next block of the cluster.
__global__ void cluster_kernel(float* out) {
  namespace cg = cooperative_groups;
  __shared__ float rank_value;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) rank_value = float(cluster.block_rank());
  cluster.sync();
  if (threadIdx.x == 0) {
    const unsigned next = (cluster.block_rank() + 1) % cluster.num_blocks();
    out[blockIdx.x] = *cluster.map_shared_rank(&rank_value, next);
  }
  cluster.sync();
}

__global__ void noop_kernel() {}

template <class Fn>
int guarded(char* msg, int size, Fn&& fn) {
  try {
    (void)cudaGetLastError();
    fn();
    return int(cudaGetLastError());
  } catch (const std::exception& e) {
    snprintf(msg, size_t(size), "%s", e.what());
    return -1;
  }
}

}  // namespace

#define EMU_SELFTEST extern "C" __attribute__((visibility("default")))

EMU_SELFTEST int emu_selftest_shuffle(int* out, int threads, int kind, int arg, int width, char* msg, int size) {
  return guarded(msg, size, [&] { shuffle_kernel<<<1, threads>>>(out, kind, arg, width); });
}

EMU_SELFTEST int emu_selftest_neighbour(const float* x, float* out, int threads, int barrier, char* msg, int size) {
  return guarded(msg, size, [&] { neighbour_kernel<<<1, threads>>>(x, out, barrier); });
}

EMU_SELFTEST int emu_selftest_offset(float* x, float* out, int threads, int shift, int write_input, char* msg,
                                     int size) {
  return guarded(msg, size, [&] { offset_kernel<<<1, threads>>>(x, out, shift, write_input); });
}

EMU_SELFTEST int emu_selftest_vector_load(const float* x, float* out, int offset, char* msg, int size) {
  return guarded(msg, size, [&] { vector_load_kernel<<<1, 1>>>(x, out, offset); });
}

EMU_SELFTEST int emu_selftest_local_array(float* out, int index, char* msg, int size) {
  return guarded(msg, size, [&] { local_array_kernel<<<1, 1>>>(out, index); });
}

EMU_SELFTEST int emu_selftest_early_exit(float* out, int threads, int active, char* msg, int size) {
  return guarded(msg, size, [&] { early_exit_kernel<<<1, threads>>>(out, unsigned(active)); });
}

EMU_SELFTEST int emu_selftest_cluster(float* out, int grid, int cluster, char* msg, int size) {
  return guarded(msg, size, [&] {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(unsigned(grid));
    config.blockDim = dim3(64);
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = unsigned(cluster);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&config, &cluster_kernel, out);
    if (err != cudaSuccess) throw std::runtime_error(std::string("launch error ") + cudaGetErrorName(err));
  });
}

EMU_SELFTEST int emu_selftest_bad_config(int grid_y, int block_x, char* msg, int size) {
  return guarded(msg, size, [&] { noop_kernel<<<dim3(1, unsigned(grid_y)), block_x>>>(); });
}
