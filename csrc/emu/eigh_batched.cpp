// The CUDA source of eigh_batched, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/eigh_batched.cu"
