// The testing kernels CUDA source, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/testing_kernels.cu"
