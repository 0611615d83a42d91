// Per-row reductions shared by the rescale-factor, RMS and LSE kernels: warp/block combination of a
// partial state, the combination of a thread-block cluster's partials through distributed shared memory
// (sm_90), and the launch of a row reduction as clusters of up to 8 blocks per row.
//
// Two levels: every block reduces its share of a row to one partial; on Hopper the blocks of a cluster
// then combine their partials through distributed shared memory. That needs no global workspace, so the
// ops stay stream-ordered, graph-capturable and safe to run concurrently on several streams. On Ampere a
// row is reduced by a single block.
#pragma once
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "dtype_io.cuh"

namespace fastguide::cuda::detail {

// A state is a trivially copyable struct of 32-bit words; shuffled word by word.
template <class State>
__device__ __forceinline__ State shfl_xor_state(const State& s, int lane_mask) {
  static_assert(sizeof(State) % 4 == 0, "reduction states are made of 32-bit words");
  constexpr int kWords = sizeof(State) / 4;
  uint32_t words[kWords];
  memcpy(words, &s, sizeof(State));
#pragma unroll
  for (int k = 0; k < kWords; ++k) words[k] = __shfl_xor_sync(0xffffffffu, words[k], lane_mask);
  State out;
  memcpy(&out, words, sizeof(State));
  return out;
}

// Combines the states of all threads of the block; the result is valid in thread 0. `Merge::identity()`
// is the neutral state. Ends with a barrier so that a caller may reduce again right away.
template <class State, class Merge>
__device__ State block_reduce(State s, Merge merge) {
  __shared__ State warp_states[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = merge(s, shfl_xor_state(s, offset));
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    s = lane < warps ? warp_states[lane] : Merge::identity();
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) s = merge(s, shfl_xor_state(s, offset));
  }
  __syncthreads();
  return s;
}

// Combines the per-block results (valid in thread 0 of each block) of a cluster; the result is valid in
// thread 0 of the cluster's block 0. Only called when the kernel was launched with clusters (sm_90+);
// every thread of every block of the cluster must call it.
template <class State, class Merge>
__device__ State cluster_reduce(State s, Merge merge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ State block_state;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) block_state = s;
  cluster.sync();
  if (cluster.block_rank() == 0 && threadIdx.x == 0) {
    const unsigned blocks = cluster.num_blocks();
    for (unsigned rank = 1; rank < blocks; ++rank) {
      s = merge(s, *cluster.map_shared_rank(&block_state, rank));
    }
  }
  // A block's shared memory must outlive the reads of the other blocks (and its reuse for the next row).
  cluster.sync();
#endif
  return s;
}

// Compute capability major and multiprocessor count of the current device, cached per device.
struct DeviceInfo {
  int cc_major = 0;
  int sm_count = 0;
};

inline DeviceInfo current_device_info(const char* op) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cc_major_cache[kMaxDevices];
  static std::atomic<int> sm_count_cache[kMaxDevices];
  int device = 0;
  throw_on_error(cudaGetDevice(&device), op);
  DeviceInfo info;
  if (device < kMaxDevices) {
    info.cc_major = cc_major_cache[device].load(std::memory_order_relaxed);
    info.sm_count = sm_count_cache[device].load(std::memory_order_relaxed);
    if (info.cc_major != 0) return info;
  }
  throw_on_error(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device), op);
  throw_on_error(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device), op);
  if (device < kMaxDevices) {
    sm_count_cache[device].store(info.sm_count, std::memory_order_relaxed);
    cc_major_cache[device].store(info.cc_major, std::memory_order_relaxed);
  }
  return info;
}

constexpr int kReduceThreads = 512;
constexpr int kMaxClusterBlocks = 8;  // the portable cluster size limit

// Blocks per row: enough to have several SMs on a long row when the batch alone cannot fill the GPU,
// clusters only on sm_90+, at least `min_elems_per_block` elements each.
inline int blocks_per_row(int64_t rows, int64_t n, int64_t min_elems_per_block, const DeviceInfo& info) {
  if (info.cc_major < 9 || rows >= 2 * int64_t(info.sm_count)) return 1;
  const int64_t wanted = (n + min_elems_per_block - 1) / min_elems_per_block;
  const int64_t fill = (2 * int64_t(info.sm_count) + rows - 1) / rows;
  int64_t blocks = wanted < fill ? wanted : fill;
  if (blocks > kMaxClusterBlocks) blocks = kMaxClusterBlocks;
  return blocks < 1 ? 1 : int(blocks);
}

// Launches `kernel` over grid (cluster_blocks, rows) as clusters of cluster_blocks x 1 blocks. Should a
// cluster not fit (a GPU partition with small GPCs), it falls back to one block per row.
template <class... KernelArgs, class... Args>
void launch_row_reduction(void (*kernel)(KernelArgs...), int cluster_blocks, int64_t rows,
                          cudaStream_t stream, const char* op, const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(cluster_blocks), grid_rows(rows), 1);
  config.blockDim = dim3(kReduceThreads, 1, 1);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (cluster_blocks > 1) {
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = unsigned(cluster_blocks);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
  if (err != cudaSuccess && cluster_blocks > 1) {
    (void)cudaGetLastError();  // clear the (non-sticky) launch error before retrying
    config.gridDim.x = 1;
    config.attrs = nullptr;
    config.numAttrs = 0;
    err = cudaLaunchKernelEx(&config, kernel, args...);
  }
  throw_on_error(err, op);
  check_launch(op);
}

}  // namespace fastguide::cuda::detail
