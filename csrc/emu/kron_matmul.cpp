// The CUDA source of kron_matmul, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/kron_matmul.cu"
