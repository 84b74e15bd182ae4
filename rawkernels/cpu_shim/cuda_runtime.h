// CPU stand-in for <cuda_runtime.h>: everything device code needs from it is
// already provided by the force-included shim.
#ifndef CUPYLARS_CUDA_RUNTIME_H
#define CUPYLARS_CUDA_RUNTIME_H
#include "cuda_cpu_shim.h"
#endif  // CUPYLARS_CUDA_RUNTIME_H
