// Launch and library-call counters of the emulated CUDA backend; plain C++, no CUDA macros, so
// that the module code can read them.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace natgrad {
namespace emu {

struct Counters {
  int64_t launches = 0;
  int64_t library_calls = 0;
  std::map<std::string, int64_t> by_name;  // kernel or library function -> calls
};
Counters counters();  // a snapshot
void reset_counters();
void count_library_call(const char* name);

}  // namespace emu
}  // namespace natgrad
