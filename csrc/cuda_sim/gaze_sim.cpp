// gaze_sim's scheduler: the threads of a block as fibers on one OS thread, switched
// at barriers and warp collectives; see gaze_sim.h.
#include "gaze_sim.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Saves the callee-saved registers and the SSE/x87 control words on the current
// stack, stores the stack pointer in *save, and resumes the stack at `next` (x86-64
// System V). swapcontext also saves the signal mask with a system call: the emulated
// tests ran twice as long with it.
#if !defined(__x86_64__)
#error "gaze_sim switches fibers with x86-64 code"
#endif
extern "C" void gaze_sim_switch(void** save, void* next);
asm(R"(
  .text
  .p2align 4
  .type gaze_sim_switch, @function
gaze_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gaze_sim_switch, .-gaze_sim_switch
)");

namespace gaze_sim {
namespace {

// AddressSanitizer is told of every stack switch (else it reports false errors).
#if defined(__SANITIZE_ADDRESS__)
const void* g_scheduler_stack = nullptr;  // bottom and size of the scheduler's stack
size_t g_scheduler_stack_size = 0;
void* g_scheduler_fake_stack = nullptr;

void entering_fiber(const char* stack, size_t size) {
  __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, stack, size);
}
void back_in_scheduler() { __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, nullptr, nullptr); }
void leaving_fiber(void** fake_stack) {  // nullptr: the fiber ends
  __sanitizer_start_switch_fiber(fake_stack, g_scheduler_stack, g_scheduler_stack_size);
}
void back_in_fiber(void* fake_stack) {
  __sanitizer_finish_switch_fiber(fake_stack, &g_scheduler_stack, &g_scheduler_stack_size);
}
#else
void entering_fiber(const char*, size_t) {}
void back_in_scheduler() {}
void leaving_fiber(void**) {}
void back_in_fiber(void*) {}
#endif

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // more needs cudaFuncSetAttribute
constexpr int kDynamicSharedLimit = 227 * 1024;      // H100's opt-in limit per block

// The opt-in limit the emulated GPU reports: H100's, or GAZE_SIM_SHARED_OPTIN bytes (a
// smaller GPU, for the kernels' fallbacks).
int shared_optin_limit() {
  static const int limit = [] {
    const char* env = std::getenv("GAZE_SIM_SHARED_OPTIN");
    return env != nullptr ? std::atoi(env) : kDynamicSharedLimit;
  }();
  return limit;
}

struct Trap {};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  // Two exchange buffers per warp (a lane may write the next collective's value
  // while its neighbours still read this one's), 32 slots of 32 bytes.
  std::vector<unsigned char> exchange;
  void* scheduler = nullptr;  // the scheduler's stack pointer while a fiber runs
  int barrier_or = 0;  // OR of the predicates at the block barrier being filled
  int barrier_result = 0;
  // How warps advance between barriers, drawn per block: in lockstep (every warp whose lanes
  // all wait in a collective goes on), or one warp at a time in a random order (each runs
  // to the barrier before the next starts: the others are held), which shows a missing
  // barrier between warps.
  bool warps_in_turn = false;
  std::vector<int> warp_turn;  // the order of the warps when in turn
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};

Block* g_block = nullptr;
std::map<const void*, int> g_max_dynamic_shared;  // cudaFuncSetAttribute, per kernel
std::vector<std::string> g_launched;               // note_kernel's record
// ldmatrix's shared-memory traffic: phases (one 8 x 8 matrix each) and the wavefronts they
// take on a GPU, one per phase unless rows of the phase share banks.
int64_t g_ldmatrix_phases = 0, g_ldmatrix_wavefronts = 0;
struct SharedVariable {
  std::unique_ptr<unsigned char[]> bytes;
  size_t size;
};
std::map<const void*, SharedVariable> g_static_shared;  // static_shared's storage, by key
size_t g_dynamic_shared_bytes = 0;                      // the launch's
// The byte unwritten shared memory holds, drawn per block: 0xFF (NaN as floats, -1 as
// integers) in most blocks, 0x00 in a quarter of them (a stale zero count or flag).
unsigned char g_poison = 0xFF;
uint32_t g_launches = 0;                           // seeds each launch's thread order

void yield() {
  void* fake_stack = nullptr;
  leaving_fiber(&fake_stack);
  gaze_sim_switch(&g_current->stack_pointer, g_block->scheduler);
  back_in_fiber(fake_stack);
}

[[noreturn]] void fiber_main() {
  back_in_fiber(nullptr);
  try {
    (*g_block->body)();
  } catch (const Trap&) {
    g_block->error = std::make_exception_ptr(std::runtime_error("__trap() in a kernel"));
  } catch (...) {
    g_block->error = std::current_exception();
  }
  g_current->state = FiberState::kDone;
  leaving_fiber(nullptr);
  void* unused;
  gaze_sim_switch(&unused, g_block->scheduler);
  __builtin_unreachable();
}

// A fresh fiber's stack as gaze_sim_switch leaves a switched-out one: control words,
// six registers, then the "return address" fiber_main (entered with the stack
// aligned as after a call).
void* initial_stack(char* stack, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
  // The last block's fibers never returned from their frames, whose redzones stay poisoned.
  ASAN_UNPOISON_MEMORY_REGION(stack, bytes);
#endif
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t controls[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(controls[0]), "=m"(controls[1]));
  std::memcpy(&slots[0], controls, 8);
  for (int r = 1; r <= 6; ++r) slots[r] = 0;
  slots[7] = reinterpret_cast<uint64_t>(&fiber_main);
  slots[8] = 0;
  return slots;
}

std::string where() {
  return "block (" + std::to_string(g_block_idx.x) + ", " + std::to_string(g_block_idx.y) +
         ", " + std::to_string(g_block_idx.z) + ")";
}

// Wakes the warps whose 32 lanes all wait in a collective or whose live lanes are all
// held (with warps_in_turn, only the first of them in warp_turn), else the block if all its
// live threads wait at the barrier; false when neither can go on (deadlock).
bool release_waiting(Block& b) {
  bool released = false;
  const int n = int(b.fibers.size());
  for (int w : b.warp_turn) {
    if (released && b.warps_in_turn) break;
    const int lanes = std::min(32, n - w * 32);
    int waiting = 0, held = 0, done = 0;
    for (int l = 0; l < lanes; ++l) {
      waiting += b.fibers[w * 32 + l].state == FiberState::kAtWarpCollective;
      held += b.fibers[w * 32 + l].state == FiberState::kHeld;
      done += b.fibers[w * 32 + l].state == FiberState::kDone;
    }
    if (held > 0 && held + done == lanes) {  // its turn
      for (int l = 0; l < lanes; ++l) {
        if (b.fibers[w * 32 + l].state == FiberState::kHeld) b.fibers[w * 32 + l].state = FiberState::kReady;
      }
      released = true;
      continue;
    }
    if (waiting == 0) continue;
    if (lanes < 32) {
      TORCH_CHECK(false, "gaze_sim: warp collective in a partial warp, ", where());
    }
    if (waiting < 32) continue;
    for (int l = 0; l < 32; ++l) {
      TORCH_CHECK(b.fibers[w * 32 + l].collectives == b.fibers[w * 32].collectives,
                  "gaze_sim: lanes of warp ", w, " wait at different warp collectives, ", where());
      b.fibers[w * 32 + l].state = FiberState::kReady;
    }
    released = true;
  }
  if (released) return true;
  int live = 0, at_barrier = 0;
  for (const Fiber& f : b.fibers) {
    live += f.state != FiberState::kDone;
    at_barrier += f.state == FiberState::kAtBlockBarrier;
  }
  if (live == 0 || at_barrier != live) return false;
  b.barrier_result = b.barrier_or;
  b.barrier_or = 0;
  for (Fiber& f : b.fibers) {
    if (f.state == FiberState::kAtBlockBarrier) f.state = b.warps_in_turn ? FiberState::kHeld : FiberState::kReady;
  }
  return true;
}

std::string describe_deadlock(const Block& b) {
  std::string s = "gaze_sim: deadlock in " + where() + ":";
  const int n = int(b.fibers.size());
  for (int w = 0; w * 32 < n; ++w) {
    int done = 0, barrier = 0, collective = 0;
    for (int l = w * 32; l < std::min(n, w * 32 + 32); ++l) {
      done += b.fibers[l].state == FiberState::kDone;
      barrier += b.fibers[l].state == FiberState::kAtBlockBarrier;
      collective += b.fibers[l].state == FiberState::kAtWarpCollective;
    }
    s += " warp " + std::to_string(w) + ": " + std::to_string(barrier) + " at __syncthreads, " +
         std::to_string(collective) + " in a warp collective, " + std::to_string(done) +
         " exited;";
  }
  return s;
}

// Threads run in a fresh random order after each barrier (seeded per launch and block),
// so a missing __syncthreads() shows as wrong results whichever thread is late.
void run_block(Block& b, std::mt19937& random) {
  b.warp_turn.resize((b.fibers.size() + 31) / 32);
  std::iota(b.warp_turn.begin(), b.warp_turn.end(), 0);
  std::shuffle(b.warp_turn.begin(), b.warp_turn.end(), random);
  b.warps_in_turn = random() % 2 == 1;
  for (size_t i = 0; i < b.fibers.size(); ++i) {
    Fiber& f = b.fibers[i];
    f.state = b.warps_in_turn ? FiberState::kHeld : FiberState::kReady;
    f.collectives = 0;
    f.async_copies.clear();  // copies a thread never waited for are dropped
    f.async_groups.clear();
    f.stack_pointer = initial_stack(b.stacks[i].get(), kStackBytes);
  }
  b.barrier_or = 0;
  std::vector<int> order(b.fibers.size());
  std::iota(order.begin(), order.end(), 0);
  for (;;) {
    std::shuffle(order.begin(), order.end(), random);
    bool ran = false;
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.state != FiberState::kReady) continue;
      g_current = &f;
      entering_fiber(b.stacks[i].get(), kStackBytes);
      gaze_sim_switch(&b.scheduler, f.stack_pointer);
      back_in_scheduler();
      g_current = nullptr;
      ran = true;
      if (b.error) std::rethrow_exception(b.error);
    }
    if (ran) continue;
    bool all_done = true;
    for (const Fiber& f : b.fibers) all_done = all_done && f.state == FiberState::kDone;
    if (all_done) return;
    TORCH_CHECK(release_waiting(b), describe_deadlock(b));
  }
}

}  // namespace

int syncthreads_or(int predicate) {
  g_current->state = FiberState::kAtBlockBarrier;
  g_block->barrier_or |= predicate != 0;
  yield();
  return g_block->barrier_result;
}

const unsigned char* warp_exchange(unsigned mask, const void* value, size_t bytes) {
  TORCH_CHECK(mask == 0xFFFFFFFFu, "gaze_sim: warp collectives with a partial mask are not emulated");
  TORCH_CHECK(bytes <= 32, "gaze_sim: warp exchange of more than 32 bytes");
  Fiber& me = *g_current;
  const int warp = int(me.thread.x / 32), lane = int(me.thread.x % 32);
  unsigned char* buffer = g_block->exchange.data() + (size_t(warp) * 2 + me.collectives % 2) * 32 * 32;
  std::memcpy(buffer + 32 * lane, value, bytes);
  me.state = FiberState::kAtWarpCollective;
  yield();
  ++me.collectives;
  return buffer;
}

void trap() { throw Trap{}; }

namespace {

// Whether the 16 bytes at p lie in the dynamic shared memory or a __shared__ variable.
bool in_shared_memory(const unsigned char* p) {
  bool in_shared = p >= g_dynamic_shared && p + 16 <= g_dynamic_shared + g_dynamic_shared_bytes;
  for (const auto& [key, v] : g_static_shared) {
    in_shared = in_shared || (p >= v.bytes.get() && p + 16 <= v.bytes.get() + v.size);
  }
  return in_shared;
}

bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void copy_async(void* dst, const void* src) {
  TORCH_CHECK(aligned_16(dst) && aligned_16(src), "gaze_sim: cp.async addresses are not 16-byte aligned");
  TORCH_CHECK(in_shared_memory(static_cast<unsigned char*>(dst)),
              "gaze_sim: cp.async destination outside shared memory");
  // Poisoned now, written at the wait: a GPU may write the bytes any time in between, so
  // a read of the destination by another thread before the issuing thread's barrier shows.
  std::memset(dst, g_poison, 16);
  g_current->async_copies.push_back({dst, src});
}

void copy_async_commit() { g_current->async_groups.push_back(g_current->async_copies.size()); }

void copy_async_wait(int pending_groups) {
  Fiber& me = *g_current;
  if (int(me.async_groups.size()) <= pending_groups) return;
  const size_t done = me.async_groups[me.async_groups.size() - pending_groups - 1];
  for (size_t i = 0; i < done; ++i) std::memcpy(me.async_copies[i].dst, me.async_copies[i].src, 16);
  me.async_copies.erase(me.async_copies.begin(), me.async_copies.begin() + done);
  me.async_groups.erase(me.async_groups.begin(), me.async_groups.end() - pending_groups);
  for (size_t& end : me.async_groups) end -= done;
}

void load_matrices_x4(const void* row_address, bool transposed, uint32_t (&r)[4]) {
  TORCH_CHECK(aligned_16(row_address), "gaze_sim: ldmatrix row address of lane ", lane_id(),
              " is not 16-byte aligned");
  TORCH_CHECK(in_shared_memory(static_cast<const unsigned char*>(row_address)),
              "gaze_sim: ldmatrix row address of lane ", lane_id(), " is outside shared memory");
  const unsigned char* slots = warp_exchange(0xFFFFFFFFu, &row_address, sizeof(row_address));
  auto row = [&](int lane) {
    const uint16_t* p;
    std::memcpy(&p, slots + 32 * lane, sizeof(p));
    return p;
  };
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  if (lane == 0) {
    // A phase reads its 8 rows of 16 bytes (4 banks each) in one wavefront when they lie
    // in 8 different groups of 4 banks; otherwise in as many as the fullest group holds.
    for (int i = 0; i < 4; ++i) {
      int rows_in_group[8] = {};
      for (int j = 0; j < 8; ++j) {
        ++rows_in_group[reinterpret_cast<uintptr_t>(row(8 * i + j)) / 16 % 8];
      }
      ++g_ldmatrix_phases;
      g_ldmatrix_wavefronts += *std::max_element(rows_in_group, rows_in_group + 8);
    }
  }
  for (int i = 0; i < 4; ++i) {
    const uint16_t lo = transposed ? row(8 * i + 2 * t)[g] : row(8 * i + g)[2 * t];
    const uint16_t hi = transposed ? row(8 * i + 2 * t + 1)[g] : row(8 * i + g)[2 * t + 1];
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

void* static_shared(const void* key, size_t bytes) {
  auto found = g_static_shared.find(key);
  if (found == g_static_shared.end()) {
    // new[] of bytes is aligned for any fundamental type; exact size for the sanitizer
    SharedVariable v{std::unique_ptr<unsigned char[]>(new unsigned char[bytes]), bytes};
    std::memset(v.bytes.get(), g_poison, bytes);
    found = g_static_shared.emplace(key, std::move(v)).first;
  }
  return found->second.bytes.get();
}

void note_kernel(const char* signature) {
  if (g_current->thread.x == 0 && g_block_idx.x == 0 && g_block_idx.y == 0 && g_block_idx.z == 0) {
    g_launched.emplace_back(signature);
  }
}

void launch_blocks(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                   const std::function<void()>& body) {
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.z > 0, "gaze_sim: launch of an empty grid (",
              grid.x, ", ", grid.y, ", ", grid.z, "): CUDA reports an invalid configuration");
  const size_t threads = size_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads > 0 && threads <= 1024, "gaze_sim: ", threads, " threads per block");
  TORCH_CHECK(block.y == 1 && block.z == 1, "gaze_sim: only 1-D blocks are emulated");
  auto attr = g_max_dynamic_shared.find(kernel);
  const size_t allowed = attr == g_max_dynamic_shared.end() ? kDefaultDynamicShared : size_t(attr->second);
  TORCH_CHECK(shared_bytes <= allowed, "gaze_sim: ", shared_bytes,
              " bytes of dynamic shared memory, but the kernel allows ", allowed,
              " (cudaFuncSetAttribute)");
  TORCH_CHECK(g_block == nullptr, "gaze_sim: kernel launch from inside a kernel");

  Block b;
  b.fibers.resize(threads);
  for (size_t i = 0; i < threads; ++i) {
    b.fibers[i].thread = make_uint3(unsigned(i), 0, 0);
    b.stacks.emplace_back(new char[kStackBytes]);
  }
  b.exchange.assign(((threads + 31) / 32) * 2 * 32 * 32, 0);
  b.body = &body;
  // Exactly the launch's bytes, so a sanitizer build sees overruns.
  std::unique_ptr<unsigned char[]> shared(new unsigned char[std::max<size_t>(shared_bytes, 1)]);
  g_block = &b;
  g_grid_dim = grid;
  g_block_dim = block;
  g_dynamic_shared = shared.get();
  g_dynamic_shared_bytes = shared_bytes;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          g_block_idx = make_uint3(x, y, z);
          std::mt19937 random(uint32_t(g_launches * 1000003u + (z * grid.y + y) * grid.x + x));
          g_poison = random() % 4 == 0 ? 0x00 : 0xFF;
          std::memset(shared.get(), g_poison, shared_bytes);
          for (auto& [key, v] : g_static_shared) std::memset(v.bytes.get(), g_poison, v.size);
          run_block(b, random);
        }
      }
    }
  } catch (...) {
    g_block = nullptr;
    g_current = nullptr;
    throw;
  }
  g_block = nullptr;
  ++g_launches;
}

}  // namespace gaze_sim

// The CUDA runtime as an H100 (compute capability 9.0) would answer.
extern "C" {

cudaError_t gaze_sim_cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t gaze_sim_cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = gaze_sim::shared_optin_limit(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t gaze_sim_cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > gaze_sim::shared_optin_limit()) {
    return cudaErrorInvalidValue;
  }
  gaze_sim::g_max_dynamic_shared[func] = value;
  return cudaSuccess;
}

cudaError_t gaze_sim_cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  *attributes = cudaFuncAttributes{};
  attributes->binaryVersion = 90;
  attributes->ptxVersion = 90;
  attributes->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

// Resident blocks per multiprocessor: 4, the split-K forward kernel's count on an H100.
cudaError_t gaze_sim_cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int,
                                                                   size_t) {
  *blocks = 4;
  return cudaSuccess;
}

}  // extern "C"

// The kernels launched since the last call, by signature (first launch order, repeats kept).
TORCH_LIBRARY_FRAGMENT(gaze_sim, m) {
  m.def("take_launched_kernels() -> str[]", [] {
    std::vector<std::string> launched;
    launched.swap(gaze_sim::g_launched);
    return launched;
  });
  // ldmatrix phases and their shared-memory wavefronts since the last call (equal when
  // the tiles' layouts are free of bank conflicts).
  m.def("take_ldmatrix_wavefronts() -> int[]", [] {
    std::vector<int64_t> counts{gaze_sim::g_ldmatrix_phases, gaze_sim::g_ldmatrix_wavefronts};
    gaze_sim::g_ldmatrix_phases = gaze_sim::g_ldmatrix_wavefronts = 0;
    return counts;
  });
}
