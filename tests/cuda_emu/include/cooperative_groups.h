// Host emulation of the parts of CUDA's cooperative_groups.h that csrc/cuda uses (see cuda_runtime.h): the
// thread block and the thread-block cluster (sm_90) of the running thread. A launch without clusters is a
// cluster of one block, as in CUDA. map_shared_rank returns the same variable in another block of the
// cluster (distributed shared memory); the blocks of a cluster run interleaved, so cluster.sync() orders them.
#pragma once
#include "cuda_runtime.h"

namespace cooperative_groups {

class thread_block {
 public:
  void sync() const { emu::sync_block(); }
  dim3 group_index() const { return dim3(blockIdx); }
  dim3 thread_index() const { return dim3(threadIdx); }
  unsigned thread_rank() const {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  }
  unsigned size() const {
    return blockDim.x * blockDim.y * blockDim.z;
  }
  unsigned num_threads() const { return size(); }
};
inline thread_block this_thread_block() { return thread_block(); }

class cluster_group {
 public:
  void sync() const { emu::sync_cluster(); }
  unsigned block_rank() const { return emu::cluster_block_rank(); }
  unsigned num_blocks() const { return emu::cluster_num_blocks(); }
  dim3 dim_blocks() const { return emu::cluster_dim(); }
  unsigned num_threads() const {
    return num_blocks() * blockDim.x * blockDim.y * blockDim.z;
  }
  template <class T>
  T* map_shared_rank(T* address, unsigned rank) const {
    return static_cast<T*>(emu::map_shared_rank(const_cast<void*>(static_cast<const void*>(address)), rank));
  }
};
inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
