/* Stand-in for the CUDA runtime header when generated .cu files are compiled for the CPU
 * emulator (tests/cuda_emu/emu.h); never used by nvcc. */
#pragma once
#include "emu.h"
