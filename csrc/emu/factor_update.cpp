// The CUDA source of factor_update_, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/factor_update.cu"
