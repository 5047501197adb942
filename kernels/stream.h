// The stream type every CUDA launcher takes as its last argument, declared without the CUDA
// headers so that kernels/<op>.h can be included by CPU-only code (the same typedef as the
// CUDA runtime's driver_types.h; repeating a typedef of the same type is allowed).
#pragma once

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
