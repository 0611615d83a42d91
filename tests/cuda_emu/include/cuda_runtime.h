// Host emulation of the CUDA runtime API and device builtins that csrc/cuda uses, so that the kernels' logic
// can be compiled with g++ and run on a CPU (tests/test_backends_cuda_emulated.py). tests/cuda_emu/build.py first
// rewrites every `kernel<<<grid, block, smem, stream>>>(args)` into emu::launch(...) and every
// `__shared__ T name[...]` into a per-block buffer (emu::block_shared); the runtime behind the emu::
// declarations below is tests/cuda_emu/emu_runtime.cpp.
//
// Emulated:
//   * Launches: the grid runs one cluster of blocks (or one block) at a time, its threads as fibers in a
//     deterministic order (index order or reversed, see emu_set_schedule). A thread runs until it finishes
//     or waits at a barrier, a warp shuffle or cluster.sync(); then the next runnable thread runs. Kernel
//     arguments are copied per thread, as by value.
//   * __syncthreads, __syncwarp, __shfl_{xor,down,up,}_sync (every lane of the warp must take part),
//     cooperative_groups::this_cluster() with sync / block_rank / num_blocks / map_shared_rank.
//     A barrier that not every thread reaches, or a shuffle whose lanes disagree, is a deadlock and fails
//     the launch, as compute-sanitizer's synccheck would.
//   * Per-block __shared__ memory, filled with 0xFF bytes at block start (NaN as floats) so that a read
//     before any write shows up in the results; at most 48 KiB of static shared memory per block.
//   * Launch checks of the runtime: block and grid limits, cluster shape, clusters only on sm_90 devices;
//     errors are returned by cudaLaunchKernelEx / reported by cudaGetLastError as CUDA does.
//   * Three emulated devices (emu_set_device): H100-like (sm_90, 132 SMs, clusters of up to 8 blocks),
//     A100-like (sm_80, 108 SMs) and a small sm_90 partition (16 SMs) on which clusters above 2 blocks
//     do not fit.
//   * Memory checking (compute-sanitizer memcheck-like): the CUDA sources are compiled with
//     -fsanitize=address in call mode and -fsanitize=alignment,bounds,...; the callbacks in
//     emu_runtime.cpp allow a kernel to touch only its own stack, its kernel arguments, its cluster's shared
//     memory and the global-memory regions that the test registered for the launch (emu_region_add, with
//     read/write permission, optionally for the blocks of one sample row only: a kernel whose grid rows
//     loop over sample rows may touch a row's region only from grid row sample_row % gridDim.y; each
//     region counts the accesses that landed in it). Misaligned accesses (a 16-byte load needs a 16-byte aligned address, as on
//     the GPU), out-of-bounds array indexing and signed overflow fail the launch too.
//
// Not emulated (limits):
//   * No real concurrency and no memory model: threads interleave only at barriers and shuffles, memory is
//     sequentially consistent, so a missing __threadfence or a race between two writers that a barrier
//     does not order is not found (only reads of shared memory before any write are, through the poison,
//     and order dependences that the forward and reverse schedules expose).
//   * Streams, events, graphs and asynchrony: a launch runs to completion before emu::launch returns, on
//     the calling host thread; faults are thrown as std::runtime_error at the launch instead of surfacing
//     as sticky errors later.
//   * Device arithmetic: host float math with -ffp-contract=off (nvcc contracts a*b+c into FMAs by
//     default), glibc expf/sqrtf instead of the device's; results agree to rounding, not bit for bit.
//   * Only what csrc/cuda uses: a missing intrinsic is a compile error, to be added here. Dynamic shared
//     memory, atomics, __launch_bounds__ limits and register/occupancy limits are not modelled.
//   * Speed: about 0.2 us per emulated thread plus the barriers, so grids of tens of millions of threads
//     (a row reduction over more than 65535 rows) are too slow to test. The stack switch is a few
//     instructions on x86-64 only; elsewhere ucontext makes each switch a system call.
//   * __CUDA_ARCH__ is 900 for the whole translation unit (host and device code share one g++ pass); the
//     architecture-dependent host decisions use the emulated device's compute capability at run time.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ----------------------------------------------------------------------------------- execution space

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// `__shared__` declarations are rewritten by build.py; one that is left over must not compile.
#define __shared__ __shared___is_rewritten_by_tests_cuda_emu_build_py

// ------------------------------------------------------------------------------------- vector types
// With the alignments of CUDA's vector_types.h, so that the alignment sanitizer checks what the GPU needs.

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// --------------------------------------------------------------------------------- runtime API types

typedef struct CUstream_st* cudaStream_t;

// Values as in CUDA's driver_types.h.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorNotSupported = 801,
  cudaErrorInvalidClusterSize = 912,
};
typedef cudaError_t cudaError;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrClusterLaunch = 120,
};

enum cudaLaunchAttributeID {
  cudaLaunchAttributeIgnore = 0,
  cudaLaunchAttributeClusterDimension = 4,
};
union cudaLaunchAttributeValue {
  char pad[64];
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  char pad[8 - sizeof(cudaLaunchAttributeID)];
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

// ------------------------------------------------------------------------------- emulator interface

namespace emu {

// Barriers and warp exchange of the running thread (see the header comment for what is checked).
void sync_block();
void sync_warp(unsigned mask);
enum ShuffleKind : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
uint64_t shuffle(unsigned mask, uint64_t bits, int kind, int lane_arg, int width);

// Shared memory: the calling block's instance of the variable identified by `tag` (poisoned when new).
void* shared_variable(const void* tag, size_t bytes, size_t align);
template <class T>
T& block_shared(const void* tag) {
  static_assert(std::is_trivially_default_constructible<T>::value && std::is_trivially_destructible<T>::value,
                "__shared__ variables are raw memory: no constructors or destructors run");
  return *static_cast<T*>(shared_variable(tag, sizeof(T), alignof(T)));
}

// Cluster of the running block (a launch without clusters is a cluster of one block, as in CUDA).
void sync_cluster();
unsigned cluster_block_rank();
unsigned cluster_num_blocks();
dim3 cluster_dim();
void* map_shared_rank(void* address, unsigned rank);

// Runs `body(ctx)` as every thread of the grid. Returns a launch error (and records it for
// cudaGetLastError) for a bad configuration; throws std::runtime_error when the kernel faults.
using KernelBody = void (*)(void*);
cudaError_t run_kernel(const void* kernel, dim3 grid, dim3 block, dim3 cluster, size_t dynamic_smem,
                       KernelBody body, void* ctx, size_t ctx_bytes);
void set_last_error(cudaError_t err);

template <class... KArgs, class... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, dim3 cluster, size_t dynamic_smem,
                          Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "wrong number of kernel arguments");
  // The argument block, as converted at the launch; each thread gets its own by-value copies.
  struct Ctx {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> params;
  };
  Ctx ctx{kernel, std::tuple<std::decay_t<KArgs>...>(std::forward<Args>(args)...)};
  return run_kernel(
      reinterpret_cast<const void*>(kernel), grid, block, cluster, dynamic_smem,
      [](void* p) {
        Ctx* c = static_cast<Ctx*>(p);
        std::apply(c->kernel, c->params);
      },
      &ctx, sizeof(ctx));
}

// `kernel<<<grid, block, smem, stream>>>(args...)` becomes emu::launch(&kernel, emu::LaunchConfig(grid,
// block, smem, stream), args...): errors go to cudaGetLastError only, as for <<<>>>.
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};
template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), const LaunchConfig& config, Args&&... args) {
  (void)launch_kernel(kernel, config.grid, config.block, dim3(1, 1, 1), config.smem, std::forward<Args>(args)...);
}

}  // namespace emu

// ----------------------------------------------------------------------------------------- builtins

// Builtin variables of the running thread: globals that the runtime sets whenever it switches threads
// (const here: a kernel cannot assign them; a thread's own values never change, so caching them is fine).
#ifndef FASTGUIDE_EMU_RUNTIME
extern const uint3 threadIdx __asm__("fastguide_emu_threadIdx");
extern const uint3 blockIdx __asm__("fastguide_emu_blockIdx");
extern const dim3 blockDim __asm__("fastguide_emu_blockDim");
extern const dim3 gridDim __asm__("fastguide_emu_gridDim");
#endif
constexpr int warpSize = 32;

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::sync_warp(mask); }

namespace emu {
template <class T>
inline T shuffle_value(unsigned mask, T value, int kind, int lane_arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                "shuffles move 32- or 64-bit values");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(mask, bits, kind, lane_arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace emu
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  return emu::shuffle_value(mask, v, emu::kShflIdx, src_lane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return emu::shuffle_value(mask, v, emu::kShflUp, int(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return emu::shuffle_value(mask, v, emu::kShflDown, int(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return emu::shuffle_value(mask, v, emu::kShflXor, lane_mask, width);
}

// Cache-hinted loads and stores are plain accesses (still checked by the memory checker).
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
// Rounded single operations; the TU is compiled with -ffp-contract=off so nothing is fused into an FMA.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// ------------------------------------------------------------------------------------- runtime API

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();  // launches are synchronous: nothing to wait for
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

namespace emu {
// The cluster shape requested by a launch configuration (1x1x1 without the attribute); zero x on error.
dim3 cluster_of(const cudaLaunchConfig_t& config, cudaError_t* err);
}  // namespace emu

template <class... KArgs, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(KArgs...), Args&&... args) {
  cudaError_t err = cudaSuccess;
  const dim3 cluster = emu::cluster_of(*config, &err);
  if (err != cudaSuccess) {
    emu::set_last_error(err);
    return err;
  }
  return emu::launch_kernel(kernel, config->gridDim, config->blockDim, cluster, config->dynamicSmemBytes,
                            std::forward<Args>(args)...);
}
