// Runtime of the CUDA host emulation (declarations and the list of what is and is not emulated:
// include/cuda_runtime.h). Compiled without sanitizers; the CUDA translation units are compiled with
// -fsanitize=address (call mode) and UBSan checks whose callbacks are defined at the end of this file.
//
// Scheduling: a launch runs one wave at a time, a wave being a cluster of blocks (one block without
// clusters). Each CUDA thread of the wave runs on a fiber (own stack with a guard page; switched by a few
// instructions on x86-64, by ucontext elsewhere or with -DFASTGUIDE_EMU_UCONTEXT). A
// thread runs until it ends or waits (barrier, shuffle, cluster.sync); then the next runnable thread in the
// wave's order runs, on the same fiber when it has not started yet (so barrier-free kernels need one
// fiber), else on its own. When no thread can run and some have not finished, the wave deadlocked.
// Every fault (deadlock, bad memory access, misaligned address, misuse of a shuffle) abandons the wave and
// makes run_kernel throw; the faulting access itself is never performed.
//
// Control API for the tests (extern "C", called through ctypes): emu_set_device, emu_set_schedule,
// emu_region_add / emu_regions_clear (global memory a kernel may touch), the launch log, and faults
// raised outside kernels (emu_take_host_fault).
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#define FASTGUIDE_EMU_RUNTIME  // defines the builtin variables below instead of declaring them const
#include "cuda_runtime.h"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
// The sanitizer callbacks are used only inside this module.
#define EMU_HOOK extern "C" __attribute__((visibility("hidden")))

namespace emu {
namespace {

// ------------------------------------------------------------------------------------------ devices

struct DeviceSpec {
  const char* name;
  int cc_major, cc_minor, sm_count;
  unsigned max_cluster_blocks;  // 0: no cluster launches
};

constexpr DeviceSpec kDevices[] = {
    {"H100-like: sm_90, 132 SMs, clusters of up to 8 blocks", 9, 0, 132, 8},
    {"A100-like: sm_80, 108 SMs, no clusters", 8, 0, 108, 0},
    {"sm_90 partition: 16 SMs, clusters of more than 2 blocks do not fit", 9, 0, 16, 2},
};
constexpr int kNumDevices = int(sizeof(kDevices) / sizeof(kDevices[0]));

int g_device = 0;
int g_schedule = 0;  // 0: blocks and threads in index order; 1: reversed
cudaError_t g_last_error = cudaSuccess;

// ------------------------------------------------------------------------------------ global memory

struct Region {
  std::string name;
  uintptr_t base;
  int64_t rows, row_bytes, stride_bytes;
  bool writable;
  // >= 0: the memory of one sample row, for the blocks that work on it only. Kernels with a row per grid
  // row loop over rows (b = blockIdx.y, blockIdx.y + gridDim.y, ...), so that is grid row
  // sample_row % gridDim.y. -1: any block.
  int64_t sample_row;
  int64_t accesses = 0;  // checked accesses that landed here (the test reads them after a launch)

  // Byte range [lo, hi) covering every row.
  uintptr_t end() const {
    return rows <= 0 ? base : base + uintptr_t((rows - 1) * stride_bytes + row_bytes);
  }
  bool contains(uintptr_t a, size_t n) const {
    if (rows <= 0 || a < base || a + n < a) return false;
    const uintptr_t off = a - base;
    if (rows == 1 || stride_bytes < row_bytes) return a + n <= end();  // one span (rows overlap or touch)
    const uintptr_t row = off / uintptr_t(stride_bytes);
    const uintptr_t within = off - row * uintptr_t(stride_bytes);
    return row < uintptr_t(rows) && within + n <= uintptr_t(row_bytes);
  }
};
std::vector<Region> g_regions;

// ---------------------------------------------------------------------------------------- launch log

struct LaunchRecord {
  uintptr_t kernel_offset;  // from the module's load address (symbolised by the test with nm)
  dim3 grid, block, cluster;
  int result;  // cudaError_t of the launch; -1: the kernel faulted
  int64_t threads, switches;
};
std::vector<LaunchRecord> g_log;
std::string g_host_fault;  // a sanitizer report outside any kernel (host code of the CUDA sources)

uintptr_t module_base() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&module_base), &info) == 0) return 0;
  return reinterpret_cast<uintptr_t>(info.dli_fbase);
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// ------------------------------------------------------------------------------------ waves, fibers

// Execution contexts. glibc's swapcontext saves the signal mask with a system call (about 0.5 us a switch,
// and block reductions switch a few times per thread per shuffle), so x86-64 switches stacks itself:
// callee-saved registers, the x87 control word and MXCSR are pushed on the old stack and popped from the new.
#if defined(__x86_64__) && !defined(FASTGUIDE_EMU_UCONTEXT)
#define EMU_STACK_SWITCH 1
extern "C" void fastguide_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl fastguide_emu_switch
  .hidden fastguide_emu_switch
  .type fastguide_emu_switch, @function
fastguide_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastguide_emu_switch, .-fastguide_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

// A context that starts `entry` (which must never return) on [stack, stack + bytes).
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  // The frame fastguide_emu_switch pops: control words, six registers, then `ret` into entry with the
  // stack aligned as after a call (a null return address above it).
  void** frame = reinterpret_cast<void**>(top - 16 - 64);
  uint16_t fcw;
  asm volatile("fnstcw %0" : "=m"(fcw));
  const uint32_t mxcsr = __builtin_ia32_stmxcsr();
  memset(frame, 0, 80);
  memcpy(&frame[0], &fcw, sizeof fcw);
  memcpy(&frame[1], &mxcsr, sizeof mxcsr);
  frame[8] = reinterpret_cast<void*>(entry);
  c.sp = frame;
}

void swap_context(Context& from, Context& to) { fastguide_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  if (getcontext(&c.uc) != 0) abort();
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void swap_context(Context& from, Context& to) {
  if (swapcontext(&from.uc, &to.uc) != 0) abort();
}
#endif

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kStaticSharedLimit = 48 << 10;

struct Thread;

struct Fiber {
  Context context;
  char* stack = nullptr;  // usable stack [stack, stack + kStackBytes), guard page below
  Thread* thread = nullptr;
  bool fresh = true;  // context must be (re)made before switching to it
};

enum ThreadState : uint8_t { kUnstarted, kReady, kRunning, kWaiting, kDone };
enum WaitKind : uint8_t { kNoWait, kWaitBlock, kWaitWarp, kWaitCluster };

struct Thread {
  uint3 idx;
  uint32_t block;  // index into Wave::blocks (= rank in the cluster)
  uint32_t warp, lane;
  ThreadState state = kUnstarted;
  WaitKind wait = kNoWait;
  Fiber* fiber = nullptr;
};

struct Warp {
  uint32_t lanes = 0;    // threads in this warp (32 except a partial last warp)
  uint32_t arrived = 0;  // lanes waiting at the current shuffle / __syncwarp
  uint32_t phase = 0;
  uint32_t mask = 0;
  int kind = 0;
  uint64_t slot[2][32];  // values deposited per phase parity (double buffered)
};

struct SharedVariable {
  const void* tag;
  size_t bytes, align;
  char* data;
};

struct Block {
  uint3 idx;
  uint32_t first = 0, count = 0;  // its threads in Wave::threads
  uint32_t barrier_arrived = 0;
  std::vector<Warp> warps;
  std::vector<SharedVariable> shared;
  size_t shared_bytes = 0;
};

struct Wave {
  dim3 grid, block, cluster;
  std::vector<Block> blocks;
  std::vector<Thread> threads;
  std::vector<uint32_t> order;  // schedule order over threads
  size_t cursor = 0;
  uint32_t runnable = 0;  // unstarted + ready
  uint32_t done = 0;
  uint32_t cluster_arrived = 0;
  KernelBody body = nullptr;
  void* ctx = nullptr;
  uintptr_t ctx_lo = 0, ctx_hi = 0;
  std::string fault;
  int64_t switches = 0;
};

std::mutex g_launch_mutex;  // one launch at a time (host threads may launch concurrently)
std::vector<std::unique_ptr<Fiber>> g_fibers;
std::vector<Fiber*> g_idle;
Context g_scheduler;
Wave* g_wave = nullptr;
Thread* g_current = nullptr;  // the CUDA thread running now (null outside kernels)
Fiber* g_fiber = nullptr;     // the fiber being switched to / running

}  // namespace
}  // namespace emu

// The builtin variables (declared const in cuda_runtime.h), set by enter() for the thread about to run.
__attribute__((visibility("hidden"))) uint3 emu_thread_idx __asm__("fastguide_emu_threadIdx");
__attribute__((visibility("hidden"))) uint3 emu_block_idx __asm__("fastguide_emu_blockIdx");
__attribute__((visibility("hidden"))) dim3 emu_block_dim __asm__("fastguide_emu_blockDim");
__attribute__((visibility("hidden"))) dim3 emu_grid_dim __asm__("fastguide_emu_gridDim");

namespace emu {
namespace {

uintptr_t g_stack_lo = 0, g_stack_hi = 0;  // the running thread's stack (checked first by check_access)

// Makes `t` (whose fiber is assigned) the running thread.
void enter(Thread* t) {
  g_current = t;
  emu_thread_idx = t->idx;
  emu_block_idx = g_wave->blocks[t->block].idx;
  g_stack_lo = reinterpret_cast<uintptr_t>(t->fiber->stack);
  g_stack_hi = g_stack_lo + kStackBytes;
}

bool is_builtin(uintptr_t a, size_t n) {
  const auto inside = [&](const void* p, size_t size) {
    return a >= uintptr_t(p) && a + n <= uintptr_t(p) + size;
  };
  return inside(&emu_thread_idx, sizeof(uint3)) || inside(&emu_block_idx, sizeof(uint3)) ||
         inside(&emu_block_dim, sizeof(dim3)) || inside(&emu_grid_dim, sizeof(dim3));
}

[[noreturn]] void die(const char* what) {
  fprintf(stderr, "fastguide CUDA emulator: %s\n", what);
  abort();
}

void fiber_main();

Fiber* new_fiber() {
  auto f = std::make_unique<Fiber>();
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) die("cannot map a fiber stack");
  if (mprotect(mem, page, PROT_NONE) != 0) die("cannot protect a fiber stack's guard page");
  f->stack = static_cast<char*>(mem) + page;
  g_fibers.push_back(std::move(f));
  return g_fibers.back().get();
}

void prepare(Fiber* f) {
  if (!f->fresh) return;
  make_context(f->context, f->stack, kStackBytes, fiber_main);
  f->fresh = false;
}

Fiber* idle_fiber() {
  if (g_idle.empty()) return new_fiber();
  Fiber* f = g_idle.back();
  g_idle.pop_back();
  return f;
}

Thread* next_runnable() {
  Wave& w = *g_wave;
  if (w.runnable == 0) return nullptr;
  for (;;) {
    Thread& t = w.threads[w.order[w.cursor]];
    w.cursor = w.cursor + 1 == w.order.size() ? 0 : w.cursor + 1;
    if (t.state == kUnstarted || t.state == kReady) return &t;
  }
}

void switch_from(Context& from, Fiber* to) {
  g_fiber = to;
  ++g_wave->switches;
  swap_context(from, to->context);
}

std::string deadlock_report();

// Leaves the current fiber for the next runnable thread, or for the scheduler when the wave is over
// (every thread done, a deadlock, or a fault). `self` may be the calling thread's fiber that is waiting,
// or an idle fiber looking for work. Returns when `self` is resumed.
void run_next(Fiber* self) {
  Wave& w = *g_wave;
  Thread* next = w.fault.empty() ? next_runnable() : nullptr;
  if (next == nullptr) {
    if (w.fault.empty() && w.done != w.threads.size()) w.fault = deadlock_report();
    g_current = nullptr;
    g_fiber = nullptr;
    swap_context(self->context, g_scheduler);
    return;
  }
  --w.runnable;
  if (next->state == kUnstarted) {
    Fiber* f = idle_fiber();
    f->thread = next;
    next->fiber = f;
    next->state = kRunning;
    enter(next);
    if (f == self) return;  // the idle caller runs it itself
    prepare(f);
    switch_from(self->context, f);
  } else {
    next->state = kRunning;
    next->wait = kNoWait;
    enter(next);
    if (next->fiber == self) return;
    switch_from(self->context, next->fiber);
  }
}

void fiber_main() {
  Fiber* self = g_fiber;
  for (;;) {
    Wave& w = *g_wave;
    Thread* t = self->thread;
    w.body(w.ctx);
    t->state = kDone;
    ++w.done;
    self->thread = nullptr;
    g_idle.push_back(self);
    run_next(self);  // returns with self->thread set (possibly in a later wave)
  }
}

// The calling thread waits: run others until it is released.
void wait_here(WaitKind kind) {
  Thread* t = g_current;
  t->state = kWaiting;
  t->wait = kind;
  run_next(t->fiber);
}

// Abandons the wave from inside a kernel thread; never returns.
[[noreturn]] void kernel_fault(const std::string& what) {
  Wave& w = *g_wave;
  const Thread* t = g_current;
  const Block& b = w.blocks[t->block];
  w.fault = format("thread (%u,%u,%u) of block (%u,%u,%u): ", t->idx.x, t->idx.y, t->idx.z, b.idx.x, b.idx.y,
                   b.idx.z) +
            what;
  Fiber* self = t->fiber;
  g_current = nullptr;
  g_fiber = nullptr;
  swap_context(self->context, g_scheduler);
  die("a faulted fiber was resumed");
}

std::string deadlock_report() {
  const Wave& w = *g_wave;
  std::string out = "deadlock: no thread can continue (" + std::to_string(w.done) + " of " +
                    std::to_string(w.threads.size()) + " threads finished)";
  int listed = 0;
  for (const Block& b : w.blocks) {
    uint32_t at_block = 0, at_cluster = 0, done = 0;
    std::vector<std::string> warps;
    for (uint32_t i = b.first; i < b.first + b.count; ++i) {
      const Thread& t = w.threads[i];
      if (t.state == kDone) ++done;
      if (t.state == kWaiting && t.wait == kWaitBlock) ++at_block;
      if (t.state == kWaiting && t.wait == kWaitCluster) ++at_cluster;
    }
    for (size_t k = 0; k < b.warps.size(); ++k) {
      if (b.warps[k].arrived != 0) {
        warps.push_back(format("warp %zu: %u of %u lanes at a shuffle/__syncwarp", k, b.warps[k].arrived,
                               b.warps[k].lanes));
      }
    }
    if (at_block == 0 && at_cluster == 0 && warps.empty()) continue;
    if (++listed > 4) {
      out += "; ...";
      break;
    }
    out += format("; block (%u,%u,%u): %u threads at __syncthreads, %u at cluster.sync, %u finished", b.idx.x,
                  b.idx.y, b.idx.z, at_block, at_cluster, done);
    for (size_t k = 0; k < warps.size() && k < 3; ++k) out += ", " + warps[k];
  }
  return out + " -- a barrier or shuffle that not every thread reaches";
}

void release(uint32_t first, uint32_t count, WaitKind kind) {
  Wave& w = *g_wave;
  for (uint32_t i = first; i < first + count; ++i) {
    Thread& t = w.threads[i];
    if (t.state == kWaiting && t.wait == kind) {
      t.state = kReady;
      ++w.runnable;
    }
  }
}

void require_kernel(const char* what) {
  if (g_current == nullptr) {
    throw std::logic_error(std::string("fastguide CUDA emulator: ") + what + " called outside a kernel");
  }
}

uintptr_t caller_offset(void* pc) { return reinterpret_cast<uintptr_t>(pc) - module_base(); }

// ----------------------------------------------------------------------------------- memory checks

std::string describe_address(uintptr_t a) {
  const Region* best = nullptr;
  for (const Region& r : g_regions) {
    if (r.base <= a && (best == nullptr || r.base > best->base)) best = &r;
  }
  if (best == nullptr) return "below every registered region";
  const uintptr_t off = a - best->base;
  if (best->rows > 1 && best->stride_bytes >= best->row_bytes) {
    const uintptr_t row = off / uintptr_t(best->stride_bytes);
    return format("'%s' + %zu bytes = row %zu + %zu bytes (%lld rows of %lld bytes, %lld bytes apart)",
                  best->name.c_str(), size_t(off), size_t(row), size_t(off - row * uintptr_t(best->stride_bytes)),
                  (long long)best->rows, (long long)best->row_bytes, (long long)best->stride_bytes);
  }
  return format("'%s' + %zu bytes (%lld bytes long)", best->name.c_str(), size_t(off),
                (long long)(best->end() - best->base));
}

Region* g_last_region = nullptr;  // where the previous global access landed (usually the next's too)

// Whether the running block works on region r's sample row (always, for a region of every block).
bool serves_running_block(const Region& r) {
  return r.sample_row < 0 || uint64_t(r.sample_row) % emu_grid_dim.y == emu_block_idx.y;
}

__attribute__((noinline)) void check_outside_stack(uintptr_t a, size_t n, bool write, void* pc) {
  const Wave& w = *g_wave;
  if (!write && ((a >= w.ctx_lo && a + n <= w.ctx_hi) || is_builtin(a, n))) return;  // arguments, builtins
  if (g_last_region != nullptr && g_last_region->contains(a, n) && (!write || g_last_region->writable) &&
      serves_running_block(*g_last_region)) {
    ++g_last_region->accesses;
    return;
  }
  for (const Block& b : w.blocks) {
    for (const SharedVariable& v : b.shared) {
      if (a >= uintptr_t(v.data) && a + n <= uintptr_t(v.data + v.bytes)) return;
    }
  }
  bool readable = false;
  const Region* other_row = nullptr;
  for (Region& r : g_regions) {
    if (r.contains(a, n)) {
      if (!serves_running_block(r)) {
        other_row = &r;
        continue;
      }
      if (!write || r.writable) {
        g_last_region = &r;
        ++r.accesses;
        return;
      }
      readable = true;
    }
  }
  const char* kind = readable ? "illegal (read-only)" : other_row != nullptr ? "other sample row's" : "out-of-bounds";
  const std::string whose =
      other_row == nullptr || readable
          ? std::string()
          : format(" (of sample row %lld: grid row %lld, not this block's)", (long long)other_row->sample_row,
                   (long long)(uint64_t(other_row->sample_row) % emu_grid_dim.y));
  kernel_fault(format("%s %zu-byte %s at 0x%zx, %s%s [pc +0x%zx]", kind, n, write ? "write" : "read", size_t(a),
                      describe_address(a).c_str(), whose.c_str(), size_t(caller_offset(pc))));
}

// Called for every load and store of the CUDA translation units; kernels mostly touch their own stack.
inline void check_access(uintptr_t a, size_t n, bool write, void* pc) {
  if (g_current == nullptr) return;  // host code: not checked
  if (a >= g_stack_lo && a + n <= g_stack_hi) return;
  check_outside_stack(a, n, write, pc);
}

// Reports undefined behaviour found by a sanitizer: a kernel fault inside a kernel, else kept for the test.
void report_ub(const std::string& what) {
  if (g_current != nullptr) kernel_fault(what);
  if (g_host_fault.empty()) g_host_fault = what;
}

// --------------------------------------------------------------------------------------------- launch

cudaError_t check_configuration(dim3 grid, dim3 block, dim3 cluster, size_t dynamic_smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024) {
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (dynamic_smem > kStaticSharedLimit) return cudaErrorInvalidValue;  // would need the opt-in attribute
  const uint64_t cluster_blocks = uint64_t(cluster.x) * cluster.y * cluster.z;
  if (cluster_blocks > 1) {
    const DeviceSpec& d = kDevices[g_device];
    if (d.max_cluster_blocks == 0) return cudaErrorNotSupported;
    if (cluster_blocks > 8 || grid.x % cluster.x || grid.y % cluster.y || grid.z % cluster.z) {
      return cudaErrorInvalidClusterSize;
    }
    if (cluster_blocks > d.max_cluster_blocks) return cudaErrorInvalidClusterSize;  // does not fit
  }
  return cudaSuccess;
}

void setup_wave(Wave& w, unsigned cx, unsigned cy, unsigned cz) {
  const dim3 c = w.cluster, bd = w.block;
  const uint32_t per_block = bd.x * bd.y * bd.z;
  const uint32_t nblocks = c.x * c.y * c.z;
  w.blocks.assign(nblocks, Block());
  w.threads.resize(size_t(nblocks) * per_block);
  for (uint32_t rank = 0; rank < nblocks; ++rank) {
    Block& b = w.blocks[rank];
    b.idx = {cx * c.x + rank % c.x, cy * c.y + (rank / c.x) % c.y, cz * c.z + rank / (c.x * c.y)};
    b.first = rank * per_block;
    b.count = per_block;
    b.warps.assign((per_block + 31) / 32, Warp());
    for (uint32_t k = 0; k < b.warps.size(); ++k) b.warps[k].lanes = std::min<uint32_t>(32, per_block - 32 * k);
    for (uint32_t linear = 0; linear < per_block; ++linear) {
      Thread& t = w.threads[b.first + linear];
      t = Thread();
      t.idx = {linear % bd.x, (linear / bd.x) % bd.y, linear / (bd.x * bd.y)};
      t.block = rank;
      t.warp = linear / 32;
      t.lane = linear % 32;
    }
  }
  w.order.resize(w.threads.size());
  for (uint32_t i = 0; i < w.order.size(); ++i) w.order[i] = g_schedule == 1 ? uint32_t(w.order.size()) - 1 - i : i;
  w.cursor = 0;
  w.runnable = uint32_t(w.threads.size());
  w.done = 0;
  w.cluster_arrived = 0;
}

void free_shared(Wave& w) {
  for (Block& b : w.blocks) {
    for (SharedVariable& v : b.shared) free(v.data);
    b.shared.clear();
  }
}

// Runs one wave to its end; returns the fault ("" when none).
std::string run_wave(Wave& w) {
  g_wave = &w;
  Thread* first = next_runnable();
  --w.runnable;
  Fiber* f = idle_fiber();
  f->thread = first;
  first->fiber = f;
  first->state = kRunning;
  enter(first);
  prepare(f);
  g_fiber = f;
  ++w.switches;
  swap_context(g_scheduler, f->context);
  g_current = nullptr;
  free_shared(w);
  if (!w.fault.empty()) {
    // Fibers stopped inside the kernel are started afresh next time.
    g_idle.clear();
    for (auto& fiber : g_fibers) {
      fiber->fresh = true;
      fiber->thread = nullptr;
      g_idle.push_back(fiber.get());
    }
  }
  g_wave = nullptr;
  return w.fault;
}

}  // namespace

// ------------------------------------------------------------------------------ builtins and barriers

void sync_block() {
  require_kernel("__syncthreads");
  Wave& w = *g_wave;
  Block& b = w.blocks[g_current->block];
  if (++b.barrier_arrived == b.count) {
    b.barrier_arrived = 0;
    release(b.first, b.count, kWaitBlock);
    return;
  }
  wait_here(kWaitBlock);
}

uint64_t shuffle(unsigned mask, uint64_t bits, int kind, int lane_arg, int width) {
  require_kernel("a warp shuffle");
  Wave& w = *g_wave;
  Thread* t = g_current;
  Block& b = w.blocks[t->block];
  Warp& warp = b.warps[t->warp];
  const uint32_t all = warp.lanes == 32 ? 0xffffffffu : (1u << warp.lanes) - 1u;
  if (mask != all) {
    kernel_fault(format("shuffle/__syncwarp with mask 0x%08x in a warp of %u threads: the emulator needs every "
                        "lane of the warp (0x%08x)",
                        mask, warp.lanes, all));
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) kernel_fault(format("shuffle width %d", width));
  if (warp.arrived == 0) {
    warp.mask = mask;
    warp.kind = kind;
  } else if (warp.kind != kind) {
    kernel_fault("the lanes of a warp are at different shuffles/__syncwarp");
  }
  const int lane = int(t->lane);
  const int segment = lane / width * width;
  int src = lane;
  switch (kind) {
    case kShflIdx: src = segment + (lane_arg % width + width) % width; break;
    case kShflUp: src = lane % width >= lane_arg ? lane - lane_arg : lane; break;
    case kShflDown: src = lane % width + lane_arg < width ? lane + lane_arg : lane; break;
    case kShflXor: src = lane ^ lane_arg; if (src >= segment + width) src = lane; break;
    default: break;  // __syncwarp: no data
  }
  if (src < 0 || src >= int(warp.lanes)) {
    kernel_fault(format("lane %d reads lane %d of a warp of %u threads", lane, src, warp.lanes));
  }
  const uint32_t phase = warp.phase;
  warp.slot[phase & 1][lane] = bits;
  if (++warp.arrived == warp.lanes) {
    warp.arrived = 0;
    ++warp.phase;
    release(b.first + t->warp * 32, warp.lanes, kWaitWarp);
  } else {
    wait_here(kWaitWarp);
  }
  return warp.slot[phase & 1][src];
}

void sync_warp(unsigned mask) { (void)shuffle(mask, 0, -1, 0, 32); }

void* shared_variable(const void* tag, size_t bytes, size_t align) {
  require_kernel("a __shared__ variable");
  Block& b = g_wave->blocks[g_current->block];
  for (const SharedVariable& v : b.shared) {
    if (v.tag == tag) return v.data;
  }
  b.shared_bytes += bytes;
  if (b.shared_bytes > kStaticSharedLimit) {
    kernel_fault(format("%zu bytes of static shared memory per block (at most %zu)", b.shared_bytes,
                        kStaticSharedLimit));
  }
  const size_t a = std::max<size_t>(align, 16);
  char* data = static_cast<char*>(aligned_alloc(a, (bytes + a - 1) / a * a));
  if (data == nullptr) die("out of memory for shared memory");
  memset(data, 0xff, bytes);  // uninitialised shared memory: NaN as fp32/fp16/bf16, -1 as integers
  b.shared.push_back({tag, bytes, align, data});
  return data;
}

void sync_cluster() {
  require_kernel("cluster.sync()");
  Wave& w = *g_wave;
  if (++w.cluster_arrived == w.threads.size()) {
    w.cluster_arrived = 0;
    release(0, uint32_t(w.threads.size()), kWaitCluster);
    return;
  }
  wait_here(kWaitCluster);
}

unsigned cluster_block_rank() {
  require_kernel("cluster.block_rank()");
  return g_current->block;
}
unsigned cluster_num_blocks() {
  require_kernel("cluster.num_blocks()");
  return unsigned(g_wave->blocks.size());
}
dim3 cluster_dim() {
  require_kernel("cluster.dim_blocks()");
  return g_wave->cluster;
}

void* map_shared_rank(void* address, unsigned rank) {
  require_kernel("cluster.map_shared_rank()");
  Wave& w = *g_wave;
  if (rank >= w.blocks.size()) {
    kernel_fault(format("map_shared_rank to block rank %u of a cluster of %zu blocks", rank, w.blocks.size()));
  }
  Block& own = w.blocks[g_current->block];
  for (const SharedVariable& v : own.shared) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(address), lo = reinterpret_cast<uintptr_t>(v.data);
    if (a >= lo && a < lo + v.bytes) {
      // The other block's instance of the variable (created poisoned if that block has not reached it).
      Block& target = w.blocks[rank];
      for (const SharedVariable& u : target.shared) {
        if (u.tag == v.tag) return u.data + (a - lo);
      }
      Thread* me = g_current;
      const uint32_t saved = me->block;
      me->block = rank;
      char* data = static_cast<char*>(shared_variable(v.tag, v.bytes, v.align));
      me->block = saved;
      return data + (a - lo);
    }
  }
  kernel_fault("map_shared_rank of an address outside the block's shared memory");
}

void set_last_error(cudaError_t err) {
  if (err != cudaSuccess) g_last_error = err;
}

dim3 cluster_of(const cudaLaunchConfig_t& config, cudaError_t* err) {
  dim3 cluster(1, 1, 1);
  if (config.numAttrs != 0 && config.attrs == nullptr) {
    *err = cudaErrorInvalidValue;
    return cluster;
  }
  for (unsigned i = 0; i < config.numAttrs; ++i) {
    const cudaLaunchAttribute& a = config.attrs[i];
    if (a.id == cudaLaunchAttributeIgnore) continue;
    if (a.id != cudaLaunchAttributeClusterDimension) {
      *err = cudaErrorNotSupported;  // an attribute this emulator does not know
      return cluster;
    }
    cluster = dim3(a.val.clusterDim.x, a.val.clusterDim.y, a.val.clusterDim.z);
    if (cluster.x == 0 || cluster.y == 0 || cluster.z == 0) *err = cudaErrorInvalidClusterSize;
  }
  return cluster;
}

cudaError_t run_kernel(const void* kernel, dim3 grid, dim3 block, dim3 cluster, size_t dynamic_smem,
                       KernelBody body, void* ctx, size_t ctx_bytes) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (g_current != nullptr) throw std::logic_error("fastguide CUDA emulator: a launch from inside a kernel");
  LaunchRecord record{reinterpret_cast<uintptr_t>(kernel) - module_base(), grid, block, cluster, 0, 0, 0};
  const cudaError_t err = check_configuration(grid, block, cluster, dynamic_smem);
  if (err != cudaSuccess) {
    record.result = int(err);
    g_log.push_back(record);
    set_last_error(err);
    return err;
  }
  const unsigned nx = grid.x / cluster.x, ny = grid.y / cluster.y, nz = grid.z / cluster.z;
  const uint64_t waves = uint64_t(nx) * ny * nz;
  Wave w;
  w.grid = grid;
  w.block = block;
  w.cluster = cluster;
  w.body = body;
  w.ctx = ctx;
  w.ctx_lo = reinterpret_cast<uintptr_t>(ctx);
  w.ctx_hi = w.ctx_lo + ctx_bytes;
  emu_block_dim = block;
  emu_grid_dim = grid;
  for (uint64_t i = 0; i < waves; ++i) {
    const uint64_t k = g_schedule == 1 ? waves - 1 - i : i;
    setup_wave(w, unsigned(k % nx), unsigned(k / nx % ny), unsigned(k / (uint64_t(nx) * ny)));
    const std::string fault = run_wave(w);
    record.threads += int64_t(w.threads.size());
    if (!fault.empty()) {
      record.result = -1;
      record.switches = w.switches;
      g_log.push_back(record);
      throw std::runtime_error(format("[cuda-emu] kernel fault [kernel +0x%zx]: ", size_t(record.kernel_offset)) +
                               fault);
    }
  }
  record.switches = w.switches;
  g_log.push_back(record);
  return cudaSuccess;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------- runtime API

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::g_last_error; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidClusterSize: return "cluster misconfiguration";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "error (emulated)";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = emu::g_device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = emu::kNumDevices;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= emu::kNumDevices) return cudaErrorInvalidDevice;
  const emu::DeviceSpec& d = emu::kDevices[device];
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; return cudaSuccess;
    case cudaDevAttrClusterLaunch: *value = d.max_cluster_blocks > 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ------------------------------------------------------------------------------ control API (ctypes)

EMU_EXPORT int emu_num_devices() { return emu::kNumDevices; }
EMU_EXPORT const char* emu_device_name(int device) {
  return device >= 0 && device < emu::kNumDevices ? emu::kDevices[device].name : "";
}
// Selects the device that cudaGetDevice reports (the kernels cache attributes per device index).
EMU_EXPORT int emu_set_device(int device) {
  if (device < 0 || device >= emu::kNumDevices) return -1;
  emu::g_device = device;
  return 0;
}
// 0: blocks and threads in index order; 1: in reverse order.
EMU_EXPORT int emu_set_schedule(int schedule) {
  if (schedule != 0 && schedule != 1) return -1;
  emu::g_schedule = schedule;
  return 0;
}
// Global memory the next launches may touch: `rows` rows of `row_bytes` bytes, `stride_bytes` apart;
// sample_row >= 0: only by the blocks of grid row sample_row % gridDim.y (see Region).
EMU_EXPORT void emu_region_add(const char* name, uint64_t base, int64_t rows, int64_t row_bytes,
                               int64_t stride_bytes, int writable, int64_t sample_row) {
  emu::g_regions.push_back({name, uintptr_t(base), rows, row_bytes, stride_bytes, writable != 0,
                            sample_row < 0 ? -1 : sample_row});
  emu::g_last_region = nullptr;  // the vector may have moved
}
EMU_EXPORT int64_t emu_num_regions() { return int64_t(emu::g_regions.size()); }
// Name (into buf) and checked accesses of region i since it was added; -1 when there is no region i.
EMU_EXPORT int64_t emu_region_accesses(int64_t i, char* buf, int size) {
  if (i < 0 || i >= int64_t(emu::g_regions.size())) return -1;
  const emu::Region& r = emu::g_regions[size_t(i)];
  if (size > 0) snprintf(buf, size_t(size), "%s", r.name.c_str());
  return r.accesses;
}
EMU_EXPORT void emu_regions_clear() {
  emu::g_regions.clear();
  emu::g_last_region = nullptr;
}
EMU_EXPORT void emu_reset_last_error() { emu::g_last_error = cudaSuccess; }

EMU_EXPORT int64_t emu_log_size() { return int64_t(emu::g_log.size()); }
EMU_EXPORT void emu_log_clear() { emu::g_log.clear(); }
// out: kernel offset, grid xyz, block xyz, cluster xyz, result, threads, switches (14 values).
EMU_EXPORT int emu_log_entry(int64_t i, int64_t* out) {
  if (i < 0 || i >= int64_t(emu::g_log.size())) return -1;
  const emu::LaunchRecord& r = emu::g_log[size_t(i)];
  const int64_t v[] = {int64_t(r.kernel_offset), r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z,
                       r.cluster.x, r.cluster.y, r.cluster.z, r.result, r.threads, r.switches, 0};
  memcpy(out, v, sizeof v);
  return 0;
}
// A sanitizer report from host code (outside kernels), then clears it; returns its length (0: none).
EMU_EXPORT int emu_take_host_fault(char* buf, int size) {
  const int n = int(emu::g_host_fault.size());
  if (n && size > 0) snprintf(buf, size_t(size), "%s", emu::g_host_fault.c_str());
  emu::g_host_fault.clear();
  return n;
}

// ---------------------------------------------------------------------------------- sanitizer hooks
// -fsanitize=address with asan-instrumentation-with-call-threshold=0 calls these for every load and store
// of the CUDA translation units (asan-stack=0 and asan-globals=0: no redzones, no shadow memory). They
// check kernel accesses against the emulated address spaces; there is no ASan runtime.

#define EMU_ASAN_ACCESS(size)                                                                           \
  EMU_HOOK void __asan_load##size(uintptr_t a) { emu::check_access(a, size, false, __builtin_return_address(0)); } \
  EMU_HOOK void __asan_store##size(uintptr_t a) { emu::check_access(a, size, true, __builtin_return_address(0)); } \
  EMU_HOOK void __asan_load##size##_noabort(uintptr_t a) {                                            \
    emu::check_access(a, size, false, __builtin_return_address(0));                                     \
  }                                                                                                     \
  EMU_HOOK void __asan_store##size##_noabort(uintptr_t a) {                                           \
    emu::check_access(a, size, true, __builtin_return_address(0));                                      \
  }
EMU_ASAN_ACCESS(1)
EMU_ASAN_ACCESS(2)
EMU_ASAN_ACCESS(4)
EMU_ASAN_ACCESS(8)
EMU_ASAN_ACCESS(16)
#undef EMU_ASAN_ACCESS
EMU_HOOK void __asan_loadN(uintptr_t a, size_t n) { emu::check_access(a, n, false, __builtin_return_address(0)); }
EMU_HOOK void __asan_storeN(uintptr_t a, size_t n) { emu::check_access(a, n, true, __builtin_return_address(0)); }
EMU_HOOK void __asan_loadN_noabort(uintptr_t a, size_t n) {
  emu::check_access(a, n, false, __builtin_return_address(0));
}
EMU_HOOK void __asan_storeN_noabort(uintptr_t a, size_t n) {
  emu::check_access(a, n, true, __builtin_return_address(0));
}
EMU_HOOK void* __asan_memcpy(void* dst, const void* src, size_t n) {
  emu::check_access(uintptr_t(src), n, false, __builtin_return_address(0));
  emu::check_access(uintptr_t(dst), n, true, __builtin_return_address(0));
  return memcpy(dst, src, n);
}
EMU_HOOK void* __asan_memmove(void* dst, const void* src, size_t n) {
  emu::check_access(uintptr_t(src), n, false, __builtin_return_address(0));
  emu::check_access(uintptr_t(dst), n, true, __builtin_return_address(0));
  return memmove(dst, src, n);
}
EMU_HOOK void* __asan_memset(void* dst, int c, size_t n) {
  emu::check_access(uintptr_t(dst), n, true, __builtin_return_address(0));
  return memset(dst, c, n);
}
EMU_HOOK void __asan_init() {}
EMU_HOOK void __asan_version_mismatch_check_v8() {}
EMU_HOOK void __asan_handle_no_return() {}

// UBSan handlers (-fsanitize=alignment,null,bounds,shift,signed-integer-overflow,...). Each handler's data
// starts with the source location; the type-mismatch data adds the type and the required alignment.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
struct TypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation location;
  const TypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
std::string where(const SourceLocation& l) { return emu::format(" at %s:%u", l.file ? l.file : "?", l.line); }
void ub(const void* data, const char* what) {
  emu::report_ub(std::string(what) + where(*static_cast<const SourceLocation*>(data)));
}
}  // namespace

EMU_HOOK void __ubsan_handle_type_mismatch_v1(TypeMismatchData* d, uintptr_t ptr) {
  const char* type = d->type ? d->type->name : "?";
  if (ptr == 0) {
    emu::report_ub(emu::format("null pointer access of type %s", type) + where(d->location));
  } else if (ptr & ((uintptr_t(1) << d->log_alignment) - 1)) {
    emu::report_ub(emu::format("misaligned address 0x%zx for type %s, which needs %u-byte alignment", size_t(ptr),
                               type, 1u << d->log_alignment) +
                   where(d->location));
  } else {
    emu::report_ub(emu::format("access of type %s at 0x%zx with insufficient space", type, size_t(ptr)) +
                   where(d->location));
  }
}
EMU_HOOK void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* d, uintptr_t ptr) {
  __ubsan_handle_type_mismatch_v1(d, ptr);
}
#define EMU_UBSAN(name, what)                                                            \
  EMU_HOOK void __ubsan_handle_##name(void* d, uintptr_t, uintptr_t) { ub(d, what); }     \
  EMU_HOOK void __ubsan_handle_##name##_abort(void* d, uintptr_t, uintptr_t) { ub(d, what); }
EMU_UBSAN(out_of_bounds, "array index out of bounds")
EMU_UBSAN(shift_out_of_bounds, "shift out of bounds")
EMU_UBSAN(add_overflow, "signed integer overflow in +")
EMU_UBSAN(sub_overflow, "signed integer overflow in -")
EMU_UBSAN(mul_overflow, "signed integer overflow in *")
EMU_UBSAN(negate_overflow, "signed integer overflow in unary -")
EMU_UBSAN(divrem_overflow, "integer division by zero or overflow")
EMU_UBSAN(vla_bound_not_positive, "variable-length array bound not positive")
EMU_UBSAN(load_invalid_value, "load of an invalid bool or enum value")
EMU_UBSAN(builtin_unreachable, "__builtin_unreachable reached")
EMU_UBSAN(missing_return, "end of a value-returning function reached without return")
EMU_UBSAN(pointer_overflow, "pointer arithmetic overflow")
EMU_UBSAN(float_cast_overflow, "float to integer conversion overflow")
#undef EMU_UBSAN
