// CPU region_topk: score every region against each query (or the mean over a
// GQA group) and keep the k best selectable regions, in the contract's order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <vector>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "vec_kernels.h"

namespace gaze::cpu {
namespace {

// Query rows scored together against every descriptor row (one pass over desc per chunk).
constexpr int32_t kQueryChunk = 16;

template <typename scalar_t>
void select_regions(const TopkArgs& args, at::Tensor& idx_out, at::Tensor& score_out) {
  using acc = acc_t<scalar_t>;
  const AttentionShape& S = args.shape;
  const int32_t G = S.group(), D = S.head_dim, Lq = S.q_len, K = S.topk;
  const int32_t R = static_cast<int32_t>(args.layout.num_regions);
  const bool shared = S.sel_heads == S.kv_heads;  // one selection per KV head
  const LayoutView layout = args.layout.view(0);
  const scalar_t* q = args.q.const_data_ptr<scalar_t>();
  const scalar_t* desc = args.desc.const_data_ptr<scalar_t>();
  const Strides4 qs = strides_of(args.q), ds = strides_of(args.desc);
  const int32_t* q_pos = args.q_pos.defined() ? args.q_pos.const_data_ptr<int32_t>() : nullptr;
  int32_t* idx = idx_out.data_ptr<int32_t>();
  float* score = score_out.data_ptr<float>();

  const int64_t chunks = (Lq + kQueryChunk - 1) / kQueryChunk;
  at::parallel_for(0, int64_t(S.batch) * S.sel_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> queries(int64_t(kQueryChunk) * D), row(D);
    std::vector<acc> scores(int64_t(kQueryChunk) * R);
    std::vector<const scalar_t*> desc_rows(R);
    std::vector<uint64_t> candidates;
    candidates.reserve(R);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (int64_t(S.sel_heads) * chunks);
      const int32_t hs = static_cast<int32_t>((item / chunks) % S.sel_heads);
      const int32_t i0 = static_cast<int32_t>(item % chunks) * kQueryChunk;
      const int32_t nq = std::min(kQueryChunk, Lq - i0);
      const int32_t hk = shared ? hs : hs / G;
      for (int32_t r = 0; r < R; ++r) desc_rows[r] = desc + ds.offset(b, hk, r);

      // A shared selection scores the group's summed query; the mean is sum / G.
      for (int32_t qi = 0; qi < nq; ++qi) {
        acc* dst = queries.data() + int64_t(qi) * D;
        if (!shared) {
          load_row(q + qs.offset(b, hs, i0 + qi), D, dst);
          continue;
        }
        std::fill(dst, dst + D, acc(0));
        for (int32_t g = 0; g < G; ++g) {
          load_row(q + qs.offset(b, hs * G + g, i0 + qi), D, row.data());
          for (int32_t d = 0; d < D; ++d) dst[d] += row[d];
        }
      }
      dot_rows(queries.data(), nq, desc_rows.data(), R, D, scores.data(), R);

      for (int32_t qi = 0; qi < nq; ++qi) {
        const int32_t i = i0 + qi;
        const int32_t limit = q_pos ? q_pos[b * Lq + i] : kNoCausalLimit;
        const acc* s = scores.data() + int64_t(qi) * R;
        auto score_of = [&](int32_t r) {
          return static_cast<float>(shared ? s[r] / static_cast<acc>(G) : s[r]);
        };
        candidates.clear();
        for (int32_t r = 0; r < R; ++r) {
          if (layout.selectable(b, r, limit)) candidates.push_back(selection_key(score_of(r), r));
        }
        const int32_t kept = std::min<int64_t>(K, candidates.size());
        if (int64_t(candidates.size()) > kept) {
          std::nth_element(candidates.begin(), candidates.begin() + (kept - 1), candidates.end(),
                           std::greater<uint64_t>());
        }
        std::sort(candidates.begin(), candidates.begin() + kept, std::greater<uint64_t>());

        const int64_t out_row = ((b * S.sel_heads + hs) * Lq + i) * K;
        for (int32_t j = 0; j < kept; ++j) {
          const int32_t r = region_of_selection_key(candidates[j]);
          idx[out_row + j] = r;
          // decoded from the key, as the GPU kernel does (which keeps only keys)
          score[out_row + j] = score_from_order_key(uint32_t(candidates[j] >> 32));
        }
        std::fill(idx + out_row + kept, idx + out_row + K, -1);
        std::fill(score + out_row + kept, score + out_row + K, kNegInf);
      }
    }
  });
}

// q [B, Hq, Lq, D], desc [B, Hkv, R, D] -> idx int32, score float32 [B, Hs, Lq, k]
std::tuple<at::Tensor, at::Tensor> region_topk_cpu(const at::Tensor& q, const at::Tensor& desc,
                                                   const at::Tensor& region_ptr, int64_t k,
                                                   bool share_kv,
                                                   const std::optional<at::Tensor>& q_pos,
                                                   const std::optional<at::Tensor>& region_pos) {
  TopkArgs args = prepare_region_topk(q, desc, region_ptr, k, share_kv, q_pos, region_pos);
  const AttentionShape& S = args.shape;
  at::Tensor idx = at::empty({S.batch, S.sel_heads, S.q_len, S.topk}, q.options().dtype(at::kInt));
  at::Tensor score = at::empty({S.batch, S.sel_heads, S.q_len, S.topk},
                               q.options().dtype(at::kFloat));
  dispatch_cpu_float_types(q.scalar_type(), "region_topk", [&](auto tag) {
    select_regions<decltype(tag)>(args, idx, score);
  });
  return {idx, score};
}

}  // namespace
}  // namespace gaze::cpu

TORCH_LIBRARY_IMPL(gaze, CPU, m) { m.impl("region_topk", &gaze::cpu::region_topk_cpu); }
