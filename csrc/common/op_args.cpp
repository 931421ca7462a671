#include "op_args.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace gaze {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Heads of q and of k/v/desc: both positive, Hq a multiple of Hkv.
void check_heads(const char* op, const char* kv_name, int64_t q_heads, int64_t kv_heads) {
  TORCH_CHECK(kv_heads >= 1, "gaze.", op, ": ", kv_name, " must have at least one head");
  TORCH_CHECK(q_heads % kv_heads == 0, "gaze.", op, ": the query heads (Hq = ", q_heads,
              ") must be a multiple of the heads of ", kv_name, " (Hkv = ", kv_heads, ")");
}

void check_fits_int32(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= kInt32Max, "gaze.", op, ": ", what, " = ", value,
              " does not fit the int32 indices");
}

void check_same_float_operand(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "gaze.", op, ": ", name, " has dtype ",
              t.scalar_type(), " but q has dtype ", q.scalar_type());
  check_device(op, name, t, q.device());
}

}  // namespace

at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

PoolArgs prepare_region_pool(const at::Tensor& keys, const at::Tensor& region_ptr,
                             const at::Tensor& region_tokens) {
  const char* op = "region_pool";
  check_float_tensor(op, "keys", keys, 4);
  check_fits_int32(op, "N (keys.size(2))", keys.size(2));
  PoolArgs args;
  args.keys = with_unit_last_stride(keys);
  args.layout = check_layout(op, keys.size(0), keys.device(), region_ptr, &region_tokens,
                             nullptr, nullptr);
  if (index_contents_checked(keys.device())) check_layout_contents(op, args.layout, keys.size(2));
  return args;
}

PoolBackwardArgs prepare_region_pool_backward(const at::Tensor& grad_desc,
                                              const at::Tensor& region_ptr,
                                              const at::Tensor& region_tokens, int64_t num_keys) {
  const char* op = "region_pool_backward";
  check_float_tensor(op, "grad_desc", grad_desc, 4);
  TORCH_CHECK(num_keys >= 0, "gaze.", op, ": num_keys must be >= 0, got ", num_keys);
  check_fits_int32(op, "num_keys", num_keys);
  PoolBackwardArgs args;
  args.grad_desc = with_unit_last_stride(grad_desc);
  args.num_keys = num_keys;
  args.layout = check_layout(op, grad_desc.size(0), grad_desc.device(), region_ptr,
                             &region_tokens, nullptr, nullptr);
  TORCH_CHECK(grad_desc.size(2) == args.layout.num_regions, "gaze.", op, ": grad_desc has ",
              grad_desc.size(2), " regions but region_ptr describes ", args.layout.num_regions);
  if (index_contents_checked(grad_desc.device())) {
    check_layout_contents(op, args.layout, num_keys);
  }
  return args;
}

TopkArgs prepare_region_topk(const at::Tensor& q, const at::Tensor& desc,
                             const at::Tensor& region_ptr, int64_t k, bool share_kv,
                             const std::optional<at::Tensor>& q_pos,
                             const std::optional<at::Tensor>& region_pos) {
  const char* op = "region_topk";
  check_float_tensor(op, "q", q, 4);
  check_float_tensor(op, "desc", desc, 4);
  check_same_float_operand(op, "desc", desc, q);
  TORCH_CHECK(desc.size(0) == q.size(0), "gaze.", op, ": desc has batch size ", desc.size(0),
              " but q has ", q.size(0));
  TORCH_CHECK(desc.size(3) == q.size(3), "gaze.", op, ": desc has head dim ", desc.size(3),
              " but q has ", q.size(3));
  check_heads(op, "desc", q.size(1), desc.size(1));
  TORCH_CHECK(k >= 1, "gaze.", op, ": k must be >= 1, got ", k);
  check_fits_int32(op, "k", k);
  check_fits_int32(op, "Lq (q.size(2))", q.size(2));
  TORCH_CHECK(!q_pos.has_value() || region_pos.has_value(), "gaze.", op,
              ": q_pos is given, so region_pos is needed to know which regions are visible");

  TopkArgs args;
  const at::Tensor* region_pos_ptr = region_pos.has_value() ? &*region_pos : nullptr;
  args.layout = check_layout(op, q.size(0), q.device(), region_ptr, nullptr, nullptr,
                             region_pos_ptr);
  TORCH_CHECK(desc.size(2) == args.layout.num_regions, "gaze.", op, ": desc has ",
              desc.size(2), " regions but region_ptr describes ", args.layout.num_regions);
  args.q_pos = check_q_pos(op, q_pos, q.size(0), q.size(2), q.device());
  args.q = with_unit_last_stride(q);
  args.desc = with_unit_last_stride(desc);
  args.shape.batch = static_cast<int32_t>(q.size(0));
  args.shape.q_heads = static_cast<int32_t>(q.size(1));
  args.shape.kv_heads = static_cast<int32_t>(desc.size(1));
  args.shape.q_len = static_cast<int32_t>(q.size(2));
  args.shape.head_dim = static_cast<int32_t>(q.size(3));
  args.shape.sel_heads = share_kv ? args.shape.kv_heads : args.shape.q_heads;
  args.shape.topk = static_cast<int32_t>(k);
  if (index_contents_checked(q.device())) check_layout_contents(op, args.layout, 0);
  return args;
}

AttentionArgs prepare_gaze_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& region_ptr,
                                     const at::Tensor& region_tokens,
                                     const at::Tensor& fixed_tokens, const at::Tensor& idx,
                                     const std::optional<at::Tensor>& q_pos, double scale) {
  check_float_tensor(op, "q", q, 4);
  check_float_tensor(op, "k", k, 4);
  check_float_tensor(op, "v", v, 4);
  check_same_float_operand(op, "k", k, q);
  check_same_float_operand(op, "v", v, q);
  TORCH_CHECK(k.sizes() == v.sizes(), "gaze.", op, ": k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "gaze.", op, ": k has batch size ", k.size(0),
              " but q has ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "gaze.", op, ": k has head dim ", k.size(3),
              " but q has ", q.size(3));
  check_heads(op, "k", q.size(1), k.size(1));
  check_fits_int32(op, "N (k.size(2))", k.size(2));
  check_fits_int32(op, "Lq (q.size(2))", q.size(2));
  TORCH_CHECK(std::isfinite(scale), "gaze.", op, ": scale must be finite, got ", scale);

  TORCH_CHECK(idx.dim() == 4, "gaze.", op, ": idx must be 4-D [B, Hs, Lq, K], got ", idx.dim(),
              "-D");
  TORCH_CHECK(idx.scalar_type() == at::kInt, "gaze.", op, ": idx must be int32, got ",
              idx.scalar_type());
  check_device(op, "idx", idx, q.device());
  TORCH_CHECK(idx.size(0) == q.size(0) && idx.size(2) == q.size(2) &&
                  (idx.size(1) == q.size(1) || idx.size(1) == k.size(1)),
              "gaze.", op, ": idx must have shape [B, Hq or Hkv, Lq, K] = [", q.size(0), ", ",
              q.size(1), " or ", k.size(1), ", ", q.size(2), ", K], got ", idx.sizes());
  check_fits_int32(op, "K (idx.size(3))", idx.size(3));

  AttentionArgs args;
  args.layout = check_layout(op, q.size(0), q.device(), region_ptr, &region_tokens,
                             &fixed_tokens, nullptr);
  args.q_pos = check_q_pos(op, q_pos, q.size(0), q.size(2), q.device());
  args.q = with_unit_last_stride(q);
  args.k = with_unit_last_stride(k);
  args.v = with_unit_last_stride(v);
  args.idx = idx.contiguous();
  args.num_keys = k.size(2);
  args.scale = scale;
  args.shape.batch = static_cast<int32_t>(q.size(0));
  args.shape.q_heads = static_cast<int32_t>(q.size(1));
  args.shape.kv_heads = static_cast<int32_t>(k.size(1));
  args.shape.q_len = static_cast<int32_t>(q.size(2));
  args.shape.head_dim = static_cast<int32_t>(q.size(3));
  args.shape.sel_heads = static_cast<int32_t>(idx.size(1));
  args.shape.topk = static_cast<int32_t>(idx.size(3));
  if (index_contents_checked(q.device())) {
    check_layout_contents(op, args.layout, args.num_keys);
    check_selection_contents(op, args.idx, args.layout.num_regions);
  }
  return args;
}

AttentionBackwardArgs prepare_gaze_attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& region_ptr, const at::Tensor& region_tokens,
    const at::Tensor& fixed_tokens, const at::Tensor& idx,
    const std::optional<at::Tensor>& q_pos, double scale) {
  const char* op = "gaze_attention_backward";
  AttentionBackwardArgs args;
  args.fwd = prepare_gaze_attention(op, q, k, v, region_ptr, region_tokens, fixed_tokens, idx,
                                    q_pos, scale);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out},
                         {"out", &out}}) {
    check_float_tensor(op, name, *t, 4);
    check_same_float_operand(op, name, *t, q);
    TORCH_CHECK(t->sizes() == q.sizes(), "gaze.", op, ": ", name, " must have the shape of q ",
                q.sizes(), ", got ", t->sizes());
  }
  const std::vector<int64_t> lse_shape{q.size(0), q.size(1), q.size(2)};
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto check_lse_like = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == lse_dtype, "gaze.", op, ": ", name, " must be ", lse_dtype,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(lse_shape), "gaze.", op, ": ", name,
                " must have shape [B, Hq, Lq] = ", at::IntArrayRef(lse_shape), ", got ",
                t.sizes());
    check_device(op, name, t, q.device());
  };
  check_lse_like("lse", lse);
  args.grad_out = with_unit_last_stride(grad_out);
  args.out = with_unit_last_stride(out);
  args.lse = lse.contiguous();
  if (grad_lse.has_value()) {
    check_lse_like("grad_lse", *grad_lse);
    args.grad_lse = grad_lse->contiguous();
  }
  return args;
}

}  // namespace gaze
