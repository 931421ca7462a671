// The torch.ops.gaze schemas. Kernels register per backend in cpu/ and cuda/;
// fakes and autograd are registered from Python (gaze_ext/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(gaze, m) {
  // Mean of each region's keys, summed in float32: keys [B, Hkv, N, D] -> [B, Hkv, R, D].
  m.def("region_pool(Tensor keys, Tensor region_ptr, Tensor region_tokens) -> Tensor");

  // Gradient of region_pool w.r.t. keys: grad_desc [B, Hkv, R, D] -> [B, Hkv, N, D].
  m.def(
      "region_pool_backward(Tensor grad_desc, Tensor region_ptr, Tensor region_tokens, "
      "SymInt num_keys) -> Tensor");

  // Top-k selectable regions per query (or per KV head with share_kv): idx int32 and
  // score float32, both [B, Hs, Lq, k]; -1 / -inf past the selectable count.
  m.def(
      "region_topk(Tensor q, Tensor desc, Tensor region_ptr, int k, bool share_kv, "
      "Tensor? q_pos, Tensor? region_pos) -> (Tensor, Tensor)");

  // Attention of each query over the fixed tokens plus its selected regions:
  // out [B, Hq, Lq, D] (dtype of q) and lse [B, Hq, Lq] float32.
  m.def(
      "gaze_attention(Tensor q, Tensor k, Tensor v, Tensor region_ptr, Tensor region_tokens, "
      "Tensor fixed_tokens, Tensor idx, Tensor? q_pos, float scale) -> (Tensor, Tensor)");

  // Gradients of gaze_attention w.r.t. q, k, v (grad_lse may be absent).
  m.def(
      "gaze_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor region_ptr, Tensor region_tokens, Tensor fixed_tokens, "
      "Tensor idx, Tensor? q_pos, float scale) -> (Tensor, Tensor, Tensor)");
}

// region_topk is not differentiable: its outputs never require grad, even when q does.
TORCH_LIBRARY_IMPL(gaze, Autograd, m) {
  m.impl("region_topk", torch::CppFunction::makeFallthrough());
}
