// The CUDA source of ekfac_precondition, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/ekfac_precondition.cu"
