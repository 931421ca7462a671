// gaze_sim's stand-in for c10's CUDA error checks (see ../../../gaze_sim.h).
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t gaze_sim_status = (expr);                                       \
    TORCH_CHECK(gaze_sim_status == cudaSuccess, "gaze_sim: ", #expr, " failed (",     \
                int(gaze_sim_status), ")");                                           \
  } while (0)

// Emulated launches report their errors by throwing.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
