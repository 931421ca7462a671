#include "checks.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace gaze {
namespace {

// Entries of one index list, and of the fixed and region token lists together: the kernels
// count a row's keys in int32, and their loops run up to a step (at most 256 keys) past the
// end. (A region selected in several slots of a row counts each time; rows that repeat huge
// regions are clamped by the CUDA key streams.)
constexpr int64_t kMaxListEntries = std::numeric_limits<int32_t>::max() - 256;

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t batch,
                        const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "gaze.", op, ": ", name,
              " must be 1-D (shared by the batch) or 2-D [B, ...], got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt, "gaze.", op, ": ", name, " must be int32, got ",
              t.scalar_type());
  check_device(op, name, t, device);
  TORCH_CHECK(t.dim() == 1 || t.size(0) == batch, "gaze.", op, ": ", name,
              " has batch size ", t.size(0), " but the operands have batch size ", batch);
  TORCH_CHECK(t.size(-1) <= kMaxListEntries, "gaze.", op, ": ", name, " has ", t.size(-1),
              " entries per batch element, more than the ", kMaxListEntries,
              " that int32 indices allow");
}

int64_t batch_stride(const at::Tensor& t) { return t.dim() == 2 ? t.size(1) : 0; }

// Contiguous host copy of an int32 tensor, for content checks.
at::Tensor host_copy(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

}  // namespace

void check_float_tensor(const char* op, const char* name, const at::Tensor& t, int64_t rank) {
  TORCH_CHECK(t.defined(), "gaze.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == rank, "gaze.", op, ": ", name, " must be ", rank, "-D, got ", t.dim(),
              "-D with shape ", t.sizes());
  auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  (dtype == at::kDouble && t.is_cpu()),
              "gaze.", op, ": ", name,
              " must be float32, float16 or bfloat16 (or float64 on CPU), got ", dtype, " on ",
              t.device());
}

void check_device(const char* op, const char* name, const at::Tensor& t,
                  const at::Device& device) {
  TORCH_CHECK(t.device() == device, "gaze.", op, ": ", name, " is on ", t.device(),
              " but the operands are on ", device);
}

LayoutView LayoutTensors::view(int64_t num_keys) const {
  LayoutView v;
  v.region_ptr = region_ptr.data_ptr<int32_t>();
  v.ptr_batch_stride = batch_stride(region_ptr);
  v.num_regions = static_cast<int32_t>(num_regions);
  if (region_tokens.defined()) {
    v.region_tokens = region_tokens.data_ptr<int32_t>();
    v.tokens_batch_stride = batch_stride(region_tokens);
    v.num_region_tokens = static_cast<int32_t>(region_tokens.size(-1));
  }
  if (fixed_tokens.defined()) {
    v.fixed_tokens = fixed_tokens.data_ptr<int32_t>();
    v.fixed_batch_stride = batch_stride(fixed_tokens);
    v.num_fixed = static_cast<int32_t>(fixed_tokens.size(-1));
  }
  if (region_pos.defined()) {
    v.region_pos = region_pos.data_ptr<int32_t>();
    v.pos_batch_stride = batch_stride(region_pos);
  }
  v.num_keys = static_cast<int32_t>(num_keys);
  return v;
}

LayoutTensors check_layout(const char* op, int64_t batch, const at::Device& device,
                           const at::Tensor& region_ptr, const at::Tensor* region_tokens,
                           const at::Tensor* fixed_tokens, const at::Tensor* region_pos) {
  LayoutTensors out;
  check_index_tensor(op, "region_ptr", region_ptr, batch, device);
  TORCH_CHECK(region_ptr.size(-1) >= 1, "gaze.", op,
              ": region_ptr must hold R+1 >= 1 entries, got shape ", region_ptr.sizes());
  out.region_ptr = region_ptr.contiguous();
  out.num_regions = region_ptr.size(-1) - 1;
  if (region_tokens) check_index_tensor(op, "region_tokens", *region_tokens, batch, device);
  if (fixed_tokens) check_index_tensor(op, "fixed_tokens", *fixed_tokens, batch, device);
  if (region_tokens && fixed_tokens) {
    const int64_t entries = fixed_tokens->size(-1) + region_tokens->size(-1);
    TORCH_CHECK(entries <= kMaxListEntries, "gaze.", op, ": fixed_tokens and region_tokens hold ",
                entries, " entries per batch element together, more than the ", kMaxListEntries,
                " that int32 key counts allow");
  }
  if (region_tokens) out.region_tokens = region_tokens->contiguous();
  if (fixed_tokens) out.fixed_tokens = fixed_tokens->contiguous();
  if (region_pos) {
    check_index_tensor(op, "region_pos", *region_pos, batch, device);
    TORCH_CHECK(region_pos->size(-1) == out.num_regions, "gaze.", op, ": region_pos has ",
                region_pos->size(-1), " entries per batch element but region_ptr describes ",
                out.num_regions, " regions");
    out.region_pos = region_pos->contiguous();
  }
  return out;
}

at::Tensor check_q_pos(const char* op, const std::optional<at::Tensor>& q_pos, int64_t batch,
                       int64_t q_len, const at::Device& device) {
  if (!q_pos.has_value()) return at::Tensor();
  const at::Tensor& t = *q_pos;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == q_len, "gaze.", op,
              ": q_pos must have shape [B, Lq] = [", batch, ", ", q_len, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, "gaze.", op, ": q_pos must be int32, got ",
              t.scalar_type());
  check_device(op, "q_pos", t, device);
  return t.contiguous();
}

bool index_contents_checked(const at::Device& device) {
  if (device.is_cpu()) return true;
  static const bool enabled = [] {
    const char* env = std::getenv("GAZE_CHECK_INDICES");
    return env != nullptr && std::strcmp(env, "0") != 0 && env[0] != '\0';
  }();
  return enabled;
}

void check_layout_contents(const char* op, const LayoutTensors& layout, int64_t num_keys) {
  const at::Tensor ptr = host_copy(layout.region_ptr);
  const int64_t R = layout.num_regions;
  const int64_t ptr_batches = ptr.dim() == 2 ? ptr.size(0) : 1;
  const int32_t* p = ptr.data_ptr<int32_t>();

  at::Tensor tokens;
  int64_t T = -1, token_batches = 1;
  if (layout.region_tokens.defined()) {
    tokens = host_copy(layout.region_tokens);
    T = tokens.size(-1);
    token_batches = tokens.dim() == 2 ? tokens.size(0) : 1;
  }
  const int64_t batches = std::max(ptr_batches, token_batches);
  for (int64_t b = 0; b < batches; ++b) {
    const int32_t* pb = p + (ptr_batches == 1 ? 0 : b) * (R + 1);
    TORCH_CHECK(pb[0] == 0, "gaze.", op, ": region_ptr[", b, ", 0] must be 0, got ", pb[0]);
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(pb[r + 1] >= pb[r], "gaze.", op, ": region_ptr decreases at batch ", b,
                  ", region ", r, " (", pb[r], " -> ", pb[r + 1], ")");
    }
    if (!tokens.defined()) continue;
    TORCH_CHECK(pb[R] <= T, "gaze.", op, ": region_ptr[", b, ", ", R, "] = ", pb[R],
                " runs past region_tokens (", T, " entries)");
    const int32_t* tb = tokens.data_ptr<int32_t>() + (token_batches == 1 ? 0 : b) * T;
    for (int64_t t = 0; t < pb[R]; ++t) {
      TORCH_CHECK(tb[t] >= 0 && tb[t] < num_keys, "gaze.", op, ": region_tokens[", b, ", ", t,
                  "] = ", tb[t], " is outside [0, N = ", num_keys, ")");
    }
  }

  if (layout.fixed_tokens.defined()) {
    const at::Tensor fixed = host_copy(layout.fixed_tokens);
    const int32_t* f = fixed.data_ptr<int32_t>();
    const int64_t F = fixed.size(-1);
    const int64_t total = fixed.numel();
    for (int64_t j = 0; j < total; ++j) {
      TORCH_CHECK(f[j] >= -1 && f[j] < num_keys, "gaze.", op, ": fixed_tokens[", j / F, ", ",
                  j % F, "] = ", f[j], " is outside [-1, N = ", num_keys, ")");
    }
  }
}

void check_selection_contents(const char* op, const at::Tensor& idx, int64_t num_regions) {
  const at::Tensor host = host_copy(idx).contiguous();
  const int32_t* s = host.data_ptr<int32_t>();
  const int64_t total = host.numel();
  for (int64_t j = 0; j < total; ++j) {
    TORCH_CHECK(s[j] >= -1 && s[j] < num_regions, "gaze.", op, ": idx holds region ", s[j],
                " (flat index ", j, "), outside [-1, R = ", num_regions, ")");
  }
}

}  // namespace gaze
