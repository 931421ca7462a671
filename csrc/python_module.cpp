// Makes gaze_ext._C importable (loading it registers the torch.ops.gaze ops)
// and reports how it was built. Kept apart from the kernels so they compile
// without Python headers.
#include <pybind11/pybind11.h>
#include <torch/version.h>

namespace gaze::cpu {
const char* simd_level();  // cpu/vec_kernels.h, without its torch includes
}

#define GAZE_STRINGIFY_(x) #x
#define GAZE_STRINGIFY(x) GAZE_STRINGIFY_(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "gaze_ext kernels; the ops live in torch.ops.gaze";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = TORCH_VERSION;
    info["cpu_simd"] = gaze::cpu::simd_level();
#ifdef GAZE_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = GAZE_STRINGIFY(GAZE_CUDA_ARCHS);
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
#endif
    return info;
  });
}
