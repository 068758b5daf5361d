// The CUDA emulation runtime: grid and block scheduling with one fiber per CUDA thread, block
// barriers, warp collectives, failure reporting and launch counters. See emu.h.
#include "emu/emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace natgrad {
namespace emu {
namespace {

enum class State { Ready, WaitBlock, WaitWarp, Done, Failed };

struct Fiber {
  ucontext_t ctx;
  State state = State::Ready;
  ThreadState ts;
  // At a block barrier: where.
  const char* bar_file = nullptr;
  int bar_line = 0;
  // At a warp collective: its arguments, and its results once released.
  unsigned mask = 0;
  const void* value = nullptr;
  void* out = nullptr;
  int bytes = 0, src = 0;
  bool pred = false;
  const char* what = nullptr;
  unsigned ballot = 0;
};

// Fiber stacks, kept per OS thread across launches, each with a guard page below it so that a stack
// overflow faults instead of corrupting a neighbour.
constexpr size_t kStackBytes = 256 * 1024;

struct Stack {
  void* base = nullptr;
  size_t bytes = 0;
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = kStackBytes + page;
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("natgrad emulation: cannot allocate a fiber stack");
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { munmap(base, bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
};

struct Block {
  const char* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int running = -1;
  std::string error;
  std::vector<unsigned char> shared;  // dynamic shared memory of the launch
};

thread_local Block* g_block = nullptr;
thread_local std::vector<std::unique_ptr<Stack>> g_stacks;
std::mutex g_counters_mutex;
Counters g_counters;

std::string dim_str(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

std::string where(const Block& b, const Fiber* f) {
  std::string s = "kernel " + std::string(b.kernel) + ", block " + dim_str(b.block_idx);
  if (f) s += ", thread " + dim_str(f->ts.thread_idx);
  return s;
}

Fiber& self() {
  if (!g_block || g_block->running < 0)
    throw std::runtime_error("natgrad emulation: a CUDA built-in was used outside of a kernel launch");
  return g_block->fibers[g_block->running];
}

void yield_to_scheduler() {
  Fiber& f = self();
  swapcontext(&f.ctx, &g_block->sched);
}

void fiber_entry() {
  Block* b = g_block;
  Fiber& f = b->fibers[b->running];
  try {
    (*b->body)();
    f.state = State::Done;
  } catch (const std::exception& e) {
    b->error = where(*b, &f) + ": " + e.what();
    f.state = State::Failed;
  }
  swapcontext(&f.ctx, &b->sched);  // never resumed
}

[[noreturn]] void abort_launch(const std::string& msg) {
  throw std::runtime_error("natgrad emulation: " + msg);
}

// Releases every complete warp collective; returns whether any was released.
bool release_warps(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int w1 = std::min(n, w0 + kWarpSize);
    for (int i = w0; i < w1; ++i) {
      Fiber& f = b.fibers[i];
      if (f.state != State::WaitWarp) continue;
      const unsigned mask = f.mask;
      // Every lane named by the mask must exist and be waiting at the same collective with the same mask.
      bool complete = true;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        const int j = w0 + lane;
        if (j >= w1)
          abort_launch(where(b, &f) + ": " + f.what + " mask 0x" + [&] {
            std::ostringstream o; o << std::hex << mask; return o.str(); }() +
            " names lane " + std::to_string(lane) + ", which does not exist in this warp");
        const Fiber& g = b.fibers[j];
        if (g.state == State::Done)
          abort_launch(where(b, &f) + ": " + f.what + " waits for lane " + std::to_string(lane) +
                       ", which has exited");
        if (g.state != State::WaitWarp) { complete = false; break; }
        if (g.mask != mask || std::string(g.what) != f.what)
          abort_launch(where(b, &f) + ": lanes of one warp are at different warp collectives (" +
                       f.what + " and " + g.what + ") or with different masks");
      }
      if (!(mask >> (i - w0) & 1u))
        abort_launch(where(b, &f) + ": " + f.what + " called by a lane that is not in its own mask");
      if (!complete) continue;
      unsigned ballot = 0;
      for (int lane = 0; lane < kWarpSize; ++lane)
        if ((mask >> lane & 1u) && b.fibers[w0 + lane].pred) ballot |= 1u << lane;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        Fiber& g = b.fibers[w0 + lane];
        if (g.bytes > 0) {
          if (g.src < 0 || g.src >= kWarpSize || !(mask >> g.src & 1u))
            abort_launch(where(b, &g) + ": " + g.what + " reads lane " + std::to_string(g.src) +
                         ", which is not in the mask");
          std::memcpy(g.out, b.fibers[w0 + g.src].value, g.bytes);
        }
        g.ballot = ballot;
        g.state = State::Ready;
      }
      released = true;
    }
  }
  return released;
}

void release_block_barrier(Block& b) {
  const Fiber* first = nullptr;
  std::vector<int> exited;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::Done) { exited.push_back(f.ts.linear); continue; }
    if (f.state != State::WaitBlock) return;  // cannot happen: checked by the caller
    if (!first) first = &f;
    if (f.bar_line != first->bar_line || std::strcmp(f.bar_file, first->bar_file) != 0)
      abort_launch(where(b, &f) + ": threads of one block wait at different __syncthreads() (line " +
                   std::to_string(first->bar_line) + " and line " + std::to_string(f.bar_line) + ")");
  }
  if (!exited.empty()) {
    std::string ids;
    for (size_t k = 0; k < exited.size() && k < 8; ++k) ids += (k ? ", " : "") + std::to_string(exited[k]);
    if (exited.size() > 8) ids += ", ...";
    abort_launch(where(b, nullptr) + ": __syncthreads() at line " + std::to_string(first->bar_line) +
                 " is not reached by every thread of the block: " + std::to_string(exited.size()) +
                 " thread(s) exited without it (linear ids " + ids + ")");
  }
  for (Fiber& f : b.fibers) f.state = State::Ready;
}

void run_block(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  while (static_cast<int>(g_stacks.size()) < n) g_stacks.push_back(std::make_unique<Stack>());
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::Ready;
    f.ts.block_idx = b.block_idx;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = static_cast<char*>(g_stacks[i]->base) + page;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (b.fibers[i].state != State::Ready) continue;
      b.running = i;
      swapcontext(&b.sched, &b.fibers[i].ctx);
      b.running = -1;
      if (b.fibers[i].state == State::Failed) abort_launch(b.error);
    }
    int done = 0, at_block = 0, at_warp = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == State::Done;
      at_block += f.state == State::WaitBlock;
      at_warp += f.state == State::WaitWarp;
    }
    if (done == n) return;
    if (at_warp > 0 && release_warps(b)) continue;
    if (at_warp == 0) {
      release_block_barrier(b);
      continue;
    }
    // Some lanes wait at a warp collective for lanes that wait at a block barrier.
    const Fiber* stuck = nullptr;
    for (const Fiber& f : b.fibers)
      if (f.state == State::WaitWarp) { stuck = &f; break; }
    abort_launch(where(b, stuck) + ": deadlock: " + std::to_string(at_warp) + " thread(s) wait at " +
                 stuck->what + " while " + std::to_string(at_block) + " wait at __syncthreads()");
  }
}

}  // namespace

// ---- public entry points -------------------------------------------------------------------------
Counters counters() {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  return g_counters;
}

void reset_counters() {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  g_counters = Counters();
}

void count_library_call(const char* name) {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  g_counters.library_calls += 1;
  g_counters.by_name[name] += 1;
}

ThreadState& current() { return self().ts; }

void fail(const std::string& what) {
  if (!g_block || g_block->running < 0) throw std::runtime_error("natgrad emulation: " + what);
  Fiber& f = self();
  g_block->error = where(*g_block, &f) + ": " + what;
  f.state = State::Failed;
  yield_to_scheduler();
  __builtin_unreachable();  // a failed fiber is never resumed
}

void syncthreads(const char* file, int line) {
  Fiber& f = self();
  f.state = State::WaitBlock;
  f.bar_file = file;
  f.bar_line = line;
  yield_to_scheduler();
}

unsigned warp_exchange(unsigned mask, const void* value, void* out, int bytes, int src, bool pred,
                       const char* what) {
  Fiber& f = self();
  f.state = State::WaitWarp;
  f.mask = mask;
  f.value = value;
  f.out = out;
  f.bytes = bytes;
  f.src = src;
  f.pred = pred;
  f.what = what;
  yield_to_scheduler();
  return f.ballot;
}

void* dynamic_shared_base() { return g_block ? g_block->shared.data() : nullptr; }
size_t dynamic_shared_bytes() { return g_block ? g_block->shared.size() : 0; }

void run_grid(const char* name_in, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  // NATGRAD_LAUNCH passes the kernel in parentheses: count it by its bare name.
  std::string bare(name_in);
  if (bare.size() > 1 && bare.front() == '(' && bare.back() == ')') bare = bare.substr(1, bare.size() - 2);
  const char* name = bare.c_str();
  {
    std::lock_guard<std::mutex> lock(g_counters_mutex);
    g_counters.launches += 1;
    g_counters.by_name[name] += 1;
  }
  // The launch-configuration limits of current GPUs, which a real launch would reject.
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    abort_launch(std::string("kernel ") + name + ": invalid block " + dim_str(block));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    abort_launch(std::string("kernel ") + name + ": invalid grid " + dim_str(grid));
  if (shared_bytes > 227 * 1024)
    abort_launch(std::string("kernel ") + name + ": " + std::to_string(shared_bytes) +
                 " bytes of dynamic shared memory exceed the 227 KiB of a block");
  if (g_block) abort_launch(std::string("kernel ") + name + ": launched from inside a kernel");

  Block b;
  b.kernel = name;
  b.body = &body;
  b.grid = grid;
  b.block = block;
  b.shared.assign(shared_bytes, 0);
  b.fibers.resize(threads);
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        ThreadState& ts = b.fibers[i].ts;
        ts.thread_idx = dim3(x, y, z);
        ts.block_dim = block;
        ts.grid_dim = grid;
        ts.linear = static_cast<int>(i);
      }
  g_block = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.block_idx = dim3(x, y, z);
          run_block(b);
        }
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

}  // namespace emu
}  // namespace natgrad

// ---- -fsanitize=bounds handlers --------------------------------------------------------------------
// The emulated kernels are compiled with -fsanitize=bounds but not linked with libubsan: these
// definitions (hidden, so they bind only within this module) turn an out-of-bounds index into a
// failed launch. Layouts follow the UBSan ABI shared by GCC and Clang.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
struct TypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct OutOfBoundsData {
  SourceLocation loc;
  const TypeDescriptor* array_type;
  const TypeDescriptor* index_type;
};

[[noreturn]] void out_of_bounds(void* data, void* index) {
  const auto* d = static_cast<const OutOfBoundsData*>(data);
  // Integer handles no wider than a pointer are passed by value.
  const int64_t i = static_cast<int64_t>(reinterpret_cast<intptr_t>(index));
  natgrad::emu::fail("index " + std::to_string(i) + " out of bounds for type " + d->array_type->name +
                     " at " + d->loc.file + ":" + std::to_string(d->loc.line));
  __builtin_unreachable();
}
}  // namespace

extern "C" {
void __ubsan_handle_out_of_bounds(void* data, void* index) { out_of_bounds(data, index); }
void __ubsan_handle_out_of_bounds_abort(void* data, void* index) { out_of_bounds(data, index); }
}
