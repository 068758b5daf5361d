// The emulated CUDA backend's controls, in plain C++ (no CUDA macros) so that the module code can
// use them: launch and library-call counters, and the checks a launch runs under.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace natgrad {
namespace emu {

struct Counters {
  int64_t launches = 0;
  int64_t library_calls = 0;
  int64_t barriers = 0;  // __syncthreads() passed, summed over blocks: a kernel's loop trips, e.g. sweeps
  int64_t uploads = 0;   // descriptor tables copied to the device (upload() in cuda/runtime.h: cache misses)
  std::map<std::string, int64_t> by_name;  // kernel or library function -> calls
};
Counters counters();  // a snapshot
void reset_counters();
void count_library_call(const char* name);
void count_upload();

// The order in which a launch runs its blocks and each block's threads. A correct kernel gives the
// same result (up to the order of float atomics) under every schedule.
//   forward   blocks and threads in index order, each thread uninterrupted until it waits
//   reverse   both in reverse index order
//   shuffle   a seeded random order of the blocks, and of the ready threads at every turn
//   preempt   shuffle, and a thread may also be switched out at any memory access
struct Checks {
  std::string schedule = "forward";
  uint64_t seed = 0;
  // Shadow-memory race detection: two threads of a block touching one shared or global element
  // between barriers, at least one writing, or two blocks of a launch touching one global element,
  // at least one writing (atomics excepted). Reported as a failed launch.
  bool races = true;  // on by default: it costs little next to the fiber switches
};
Checks checks();
void set_checks(const Checks& c);  // throws std::invalid_argument for an unknown schedule

}  // namespace emu
}  // namespace natgrad
