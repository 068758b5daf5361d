// The CUDA source of precondition, compiled for the CPU as the emulated backend (see emu.h).
#include "cuda/precondition.cu"
