// The CUDA source of damped_inverse, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/damped_inverse.cu"
