// How the CPU kernels share the cores among many independent per-layer jobs (eigendecompositions,
// preconditioning products) of very different sizes.
//
// Running each job on one thread, many at once, beats running them one at a time on all threads
// (LAPACK and small GEMMs scale poorly across threads), as long as the threads finish together. A
// job bigger than an even share of all the work cannot be balanced against the rest: it runs
// alone, on all threads, first. The others are dealt, largest first, to the least loaded lane.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace natgrad {
namespace cpu_kernels {

// Runs job(i) for every i in [0, work.size()), work[i] its cost in any unit.
template <typename Job>
void run_balanced(const std::vector<double>& work, const Job& job) {
  const int64_t count = static_cast<int64_t>(work.size());
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  double left = std::accumulate(work.begin(), work.end(), 0.0);
  int64_t first = 0;
  while (first < count && (count - first == 1 || threads == 1 || work[order[first]] * threads > left)) {
    job(order[first]);  // alone: whatever threads the job's library uses
    left -= work[order[first++]];
  }
  if (first == count) return;
  const int64_t lanes = std::min<int64_t>(threads, count - first);
  std::vector<std::vector<int64_t>> lane(lanes);
  std::vector<double> load(lanes, 0.0);
  for (int64_t k = first; k < count; ++k) {
    const int64_t l = std::min_element(load.begin(), load.end()) - load.begin();
    lane[l].push_back(order[k]);
    load[l] += work[order[k]];
  }
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {  // inside, ATen and LAPACK run single-threaded
    for (int64_t l = begin; l < end; ++l)
      for (int64_t i : lane[l]) job(i);
  });
}

}  // namespace cpu_kernels
}  // namespace natgrad
