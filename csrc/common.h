// Small definitions shared by host (C++) and device (CUDA) code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NATGRAD_HOST_DEVICE __host__ __device__
#else
#define NATGRAD_HOST_DEVICE
#endif

namespace natgrad {

// Accumulation type: fp64 stays fp64, every other floating type accumulates in fp32.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };

}  // namespace natgrad
