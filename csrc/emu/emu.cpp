// The CUDA emulation runtime: grid and block scheduling with one fiber per CUDA thread, block
// barriers, warp collectives, failure reporting and launch counters. See emu.h.
#include "emu/emu.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
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

enum class Order { Forward, Reverse, Shuffle, Preempt };

// One access remembered by the race detector: who, and in which barrier interval.
struct Access {
  int64_t block = -1;  // linear block index; -1: none
  int thread = -1;     // linear thread index within the block
  uint64_t epoch = 0;  // barrier interval (unique over the launch: blocks do not share one)
  const void* site = nullptr;
};
// Shadow of one element: its last write, and its reads since then (one remembered, with flags for
// several threads of that interval and for several blocks).
struct Shadow {
  Access write, read;
  bool reads_many = false, reads_blocks = false;
};

struct Block {
  const char* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  dim3 grid, block, block_idx;
  int64_t block_linear = 0;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int running = -1;
  std::string error;
  std::vector<unsigned char> shared;  // dynamic shared memory of the launch
  size_t static_shared = 0;           // bytes of NATGRAD_SHARED arrays touched by this block
  // schedule
  Order order = Order::Forward;
  std::mt19937_64 rng;
  bool races = false;
  // race detection: the current barrier interval, where it began, and the shadows
  uint64_t epoch = 0;
  const char* epoch_file = nullptr;
  int epoch_line = 0;
  std::unordered_map<const void*, Shadow> shared_shadow;  // cleared for every block
  std::unordered_map<const void*, Shadow> global_shadow;  // kept over the launch
};

thread_local Block* g_block = nullptr;
thread_local std::vector<std::unique_ptr<Stack>> g_stacks;
thread_local uint64_t g_block_serial = 0;
std::mutex g_counters_mutex;
Counters g_counters;
Checks g_checks;                                   // under g_counters_mutex
std::unordered_map<const void*, size_t> g_opt_in;  // kernel -> dynamic shared bytes allowed; same mutex
constexpr size_t kDefaultShared = 48 * 1024, kMaxShared = 227 * 1024;
constexpr double kPreemptProbability = 0.125;

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
  {
    std::lock_guard<std::mutex> lock(g_counters_mutex);
    g_counters.barriers += 1;
  }
  ++b.epoch;  // accesses on either side of a barrier are ordered
  b.epoch_file = first->bar_file;
  b.epoch_line = first->bar_line;
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
  // A new block: fresh shared memory (poisoned), a new barrier interval, no shared shadows.
  ++g_block_serial;
  std::fill(b.shared.begin(), b.shared.end(), static_cast<unsigned char>(0xFF));
  b.static_shared = 0;
  b.shared_shadow.clear();
  ++b.epoch;
  b.epoch_file = nullptr;
  b.epoch_line = 0;
  std::vector<int> turn(n);
  std::iota(turn.begin(), turn.end(), 0);
  if (b.order == Order::Reverse) std::reverse(turn.begin(), turn.end());
  for (;;) {
    if (b.order == Order::Shuffle || b.order == Order::Preempt) std::shuffle(turn.begin(), turn.end(), b.rng);
    for (const int i : turn) {
      if (b.fibers[i].state != State::Ready) continue;
      b.running = i;
      swapcontext(&b.sched, &b.fibers[i].ctx);
      b.running = -1;
      if (b.fibers[i].state == State::Failed) abort_launch(b.error);
    }
    int done = 0, ready = 0, at_block = 0, at_warp = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == State::Done;
      ready += f.state == State::Ready;  // switched out at a memory access ("preempt")
      at_block += f.state == State::WaitBlock;
      at_warp += f.state == State::WaitWarp;
    }
    if (done == n) return;
    if (ready > 0) continue;
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

std::string base_name(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// "file:line" of a code address in this module, from its debug line tables through addr2line (the
// innermost frame outside the emulator's own headers); "" when that is not available.
std::string describe_site(const void* site) {
  Dl_info info;
  if (!site || !dladdr(site, &info) || !info.dli_fname) return "";
  const uintptr_t offset = reinterpret_cast<uintptr_t>(site) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  std::ostringstream cmd;
  cmd << "addr2line -i -e '" << info.dli_fname << "' 0x" << std::hex << offset << " 2>/dev/null";
  FILE* pipe = popen(cmd.str().c_str(), "r");
  if (!pipe) return "";
  std::string found;
  char line[4096];
  while (fgets(line, sizeof(line), pipe)) {
    std::string l(line);
    while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
    const size_t paren = l.find(" (");
    if (paren != std::string::npos) l = l.substr(0, paren);
    if (!found.empty() || l.find("??") != std::string::npos || l.find("/emu/") != std::string::npos) continue;
    found = base_name(l);
  }
  pclose(pipe);
  return found;
}

std::string thread_str(const Block& b, int64_t block, int thread) {
  // Block and thread indices as (x, y, z), from their linear forms.
  auto unflatten = [](int64_t i, const dim3& d) {
    return dim3(static_cast<unsigned>(i % d.x), static_cast<unsigned>(i / d.x % d.y),
                static_cast<unsigned>(i / (int64_t(d.x) * d.y)));
  };
  return "thread " + dim_str(unflatten(thread, b.block)) + " of block " + dim_str(unflatten(block, b.grid));
}

[[noreturn]] void report_race(const Block& b, Space space, const Access& now, bool now_writes, const Access& then,
                              bool then_wrote) {
  std::string where_line;
  if (now.block != then.block) {
    where_line = "in another block of the same launch";
  } else {
    where_line = "with no __syncthreads() between them (both after ";
    where_line += b.epoch_file ? "the __syncthreads() at " + base_name(b.epoch_file) + ":" + std::to_string(b.epoch_line)
                               : std::string("the block's start");
    where_line += ")";
  }
  std::string msg = std::string("data race on ") + (space == Space::Shared ? "shared" : "global") + " memory: " +
                    thread_str(b, now.block, now.thread) + (now_writes ? " writes" : " reads") +
                    " an element that " + thread_str(b, then.block, then.thread) + (then_wrote ? " wrote" : " read") +
                    " " + where_line;
  const std::string at_now = describe_site(now.site), at_then = describe_site(then.site);
  if (!at_now.empty() || !at_then.empty())
    msg += "; accesses at " + (at_now.empty() ? "?" : at_now) + " and " + (at_then.empty() ? "?" : at_then);
  fail(msg);
}

// Whether an earlier access and the current one are unordered: different blocks of a launch (no
// barrier orders them), or different threads of one block in one barrier interval.
bool conflicts(const Access& then, const Access& now) {
  if (then.block < 0) return false;
  if (then.block != now.block) return true;
  return then.thread != now.thread && then.epoch == now.epoch;
}

void check_access(Block& b, const void* addr, Space space, bool write, const void* site) {
  Shadow& sh = (space == Space::Shared ? b.shared_shadow : b.global_shadow)[addr];
  const Access now{b.block_linear, b.fibers[b.running].ts.linear, b.epoch, site};
  if (conflicts(sh.write, now)) report_race(b, space, now, write, sh.write, true);
  if (write) {
    if (sh.read.block >= 0 &&
        (sh.reads_blocks || sh.read.block != now.block ||
         (sh.read.epoch == now.epoch && (sh.reads_many || sh.read.thread != now.thread))))
      report_race(b, space, now, true, sh.read, false);
    // Every earlier read is now ordered before this write, and a later access that conflicts with
    // one of them conflicts with this write too.
    sh.write = now;
    sh.read = Access();
    sh.reads_many = sh.reads_blocks = false;
    return;
  }
  if (sh.read.block < 0) {
    sh.read = now;
  } else if (sh.read.block != now.block) {
    sh.reads_blocks = true;
  } else if (sh.read.epoch == now.epoch) {
    sh.reads_many |= sh.read.thread != now.thread;
  } else {
    sh.read = now;
    sh.reads_many = false;
  }
}

}  // namespace

thread_local bool g_watch = false;

void record_access(const void* addr, Space space, bool write) {
  const void* site = __builtin_return_address(0);
  Block* b = g_block;
  if (!b || b->running < 0) return;  // host code reading through a dev_ptr: nothing to watch
  if (b->races) check_access(*b, addr, space, write, site);
  if (b->order == Order::Preempt && std::uniform_real_distribution<double>(0.0, 1.0)(b->rng) < kPreemptProbability)
    yield_to_scheduler();  // stays Ready: another thread runs first
}

uint64_t block_serial() { return g_block_serial; }

void declare_static_shared(size_t bytes) {
  Block* b = g_block;
  if (!b) return;
  b->static_shared += bytes;
  if (b->static_shared > kDefaultShared)
    fail("the block's static __shared__ arrays take " + std::to_string(b->static_shared) +
         " bytes, more than the 48 KiB a kernel may declare statically");
  if (b->static_shared + b->shared.size() > kMaxShared)
    fail(std::to_string(b->static_shared) + " bytes of static and " + std::to_string(b->shared.size()) +
         " of dynamic shared memory exceed the 227 KiB of a block");
}

void set_max_dynamic_shared(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  g_opt_in[kernel] = bytes;
}

Checks checks() {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  return g_checks;
}

void set_checks(const Checks& c) {
  if (c.schedule != "forward" && c.schedule != "reverse" && c.schedule != "shuffle" && c.schedule != "preempt")
    throw std::invalid_argument("unknown emulation schedule '" + c.schedule +
                                "': expected forward, reverse, shuffle or preempt");
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  g_checks = c;
}

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

void count_upload() {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  g_counters.uploads += 1;
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

void run_grid(const char* name_in, const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body) {
  // NATGRAD_LAUNCH passes the kernel in parentheses: count it by its bare name.
  std::string bare(name_in);
  if (bare.size() > 1 && bare.front() == '(' && bare.back() == ')') bare = bare.substr(1, bare.size() - 2);
  const char* name = bare.c_str();
  Checks checks;
  size_t opt_in = kDefaultShared;
  uint64_t launch_number = 0;
  {
    std::lock_guard<std::mutex> lock(g_counters_mutex);
    launch_number = ++g_counters.launches;
    g_counters.by_name[name] += 1;
    checks = g_checks;
    const auto it = g_opt_in.find(kernel);
    if (it != g_opt_in.end()) opt_in = std::max(opt_in, it->second);
  }
  // The launch-configuration limits of current GPUs, which a real launch would reject.
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    abort_launch(std::string("kernel ") + name + ": invalid block " + dim_str(block));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    abort_launch(std::string("kernel ") + name + ": invalid grid " + dim_str(grid));
  if (shared_bytes > kMaxShared)
    abort_launch(std::string("kernel ") + name + ": " + std::to_string(shared_bytes) +
                 " bytes of dynamic shared memory exceed the 227 KiB of a block");
  if (shared_bytes > opt_in)
    abort_launch(std::string("kernel ") + name + ": " + std::to_string(shared_bytes) +
                 " bytes of dynamic shared memory need an opt-in above " + std::to_string(opt_in) +
                 " (set_max_dynamic_shared), as a GPU needs cudaFuncAttributeMaxDynamicSharedMemorySize");
  if (g_block) abort_launch(std::string("kernel ") + name + ": launched from inside a kernel");

  Block b;
  b.kernel = name;
  b.body = &body;
  b.grid = grid;
  b.block = block;
  b.shared.assign(shared_bytes, 0xFF);
  b.fibers.resize(threads);
  b.order = checks.schedule == "reverse"   ? Order::Reverse
            : checks.schedule == "shuffle" ? Order::Shuffle
            : checks.schedule == "preempt" ? Order::Preempt
                                           : Order::Forward;
  b.races = checks.races;
  // Deterministic for a seed: the same launches in the same order see the same schedule.
  b.rng.seed(checks.seed * 0x9E3779B97F4A7C15ull + launch_number);
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        ThreadState& ts = b.fibers[i].ts;
        ts.thread_idx = dim3(x, y, z);
        ts.block_dim = block;
        ts.grid_dim = grid;
        ts.linear = static_cast<int>(i);
      }
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  std::vector<int64_t> sequence(blocks);
  std::iota(sequence.begin(), sequence.end(), int64_t(0));
  if (b.order == Order::Reverse) std::reverse(sequence.begin(), sequence.end());
  if (b.order == Order::Shuffle || b.order == Order::Preempt) std::shuffle(sequence.begin(), sequence.end(), b.rng);
  g_block = &b;
  g_watch = b.races || b.order == Order::Preempt;
  try {
    for (const int64_t k : sequence) {
      b.block_linear = k;
      b.block_idx = dim3(static_cast<unsigned>(k % grid.x), static_cast<unsigned>(k / grid.x % grid.y),
                         static_cast<unsigned>(k / (int64_t(grid.x) * grid.y)));
      run_block(b);
    }
  } catch (...) {
    g_block = nullptr;
    g_watch = false;
    throw;
  }
  g_block = nullptr;
  g_watch = false;
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
