// The CUDA source of kfac_update_, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/kfac_update.cu"
