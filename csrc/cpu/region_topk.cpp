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
#include "../common/work_split.h"
#include "vec_kernels.h"

namespace gaze::cpu {
namespace {

// Query rows scored together against every descriptor row (one pass over desc per chunk).
constexpr int32_t kQueryChunk = 16;

// The K largest selection keys, in descending order, as region ids and scores; slots past
// the candidates are padding (-1, -inf). Reorders `candidates`.
void write_top_k(std::vector<uint64_t>& candidates, int32_t K, int32_t* idx /*[K]*/,
                 float* score /*[K]*/) {
  const int32_t kept = std::min<int64_t>(K, candidates.size());
  if (int64_t(candidates.size()) > kept) {
    std::nth_element(candidates.begin(), candidates.begin() + (kept - 1), candidates.end(),
                     std::greater<uint64_t>());
  }
  std::sort(candidates.begin(), candidates.begin() + kept, std::greater<uint64_t>());
  for (int32_t j = 0; j < kept; ++j) {
    idx[j] = region_of_selection_key(candidates[j]);
    // decoded from the key, as the GPU kernel does (which keeps only keys)
    score[j] = score_from_order_key(uint32_t(candidates[j] >> 32));
  }
  std::fill(idx + kept, idx + K, -1);
  std::fill(score + kept, score + K, kNegInf);
}

// The rows a (batch, KV head) scores against its descriptors: one per position with a
// shared selection (the group's summed query), G per position otherwise (row i * G + g is
// head g at position i), so a KV head's descriptors are read once for all its query heads.
// Each (batch, KV head) is cut into pieces of rows, as many as keep every thread busy.
template <typename scalar_t>
void select_regions(const TopkArgs& args, at::Tensor& idx_out, at::Tensor& score_out) {
  using acc = acc_t<scalar_t>;
  const AttentionShape& S = args.shape;
  const int32_t G = S.group(), D = S.head_dim, Lq = S.q_len, K = S.topk;
  const int32_t R = static_cast<int32_t>(args.layout.num_regions);
  const bool shared = S.sel_heads == S.kv_heads;  // one selection per KV head
  const int32_t heads_per_row = shared ? 1 : G;   // selection heads among a position's rows
  const int64_t rows = int64_t(Lq) * heads_per_row;
  const LayoutView layout = args.layout.view(0);
  const scalar_t* q = args.q.const_data_ptr<scalar_t>();
  const scalar_t* desc = args.desc.const_data_ptr<scalar_t>();
  const Strides4 qs = strides_of(args.q), ds = strides_of(args.desc);
  const int32_t* q_pos = args.q_pos.defined() ? args.q_pos.const_data_ptr<int32_t>() : nullptr;
  int32_t* idx = idx_out.data_ptr<int32_t>();
  float* score = score_out.data_ptr<float>();

  const int64_t groups = int64_t(S.batch) * S.kv_heads;
  const int64_t pieces =
      std::max((rows + kQueryChunk - 1) / kQueryChunk,
               pieces_filling_rounds(groups, at::get_num_threads(), rows));
  at::parallel_for(0, groups * pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> queries(int64_t(kQueryChunk) * D), row(D);
    std::vector<acc> scores(int64_t(kQueryChunk) * R);
    std::vector<const scalar_t*> desc_rows(R);
    std::vector<int32_t> nonempty;  // the regions of batch element `nonempty_of` with keys
    nonempty.reserve(R);
    int64_t nonempty_of = -1;
    std::vector<uint64_t> candidates;
    candidates.reserve(R);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / pieces, piece = item % pieces;
      const int64_t b = group / S.kv_heads;
      const int32_t hk = static_cast<int32_t>(group % S.kv_heads);
      for (int32_t r = 0; r < R; ++r) desc_rows[r] = desc + ds.offset(b, hk, r);
      if (nonempty_of != b) {
        nonempty.clear();
        for (int32_t r = 0; r < R; ++r) {
          if (layout.nonempty(b, r)) nonempty.push_back(r);
        }
        nonempty_of = b;
      }
      const int64_t piece_end = rows * (piece + 1) / pieces;
      for (int64_t r0 = rows * piece / pieces; r0 < piece_end; r0 += kQueryChunk) {
        const int32_t nr = static_cast<int32_t>(std::min<int64_t>(kQueryChunk, piece_end - r0));
        // A shared selection scores the group's summed query; the mean is sum / G.
        for (int32_t t = 0; t < nr; ++t) {
          const int32_t i = static_cast<int32_t>((r0 + t) / heads_per_row);
          acc* dst = queries.data() + int64_t(t) * D;
          if (!shared) {
            load_row(q + qs.offset(b, hk * G + (r0 + t) % heads_per_row, i), D, dst);
            continue;
          }
          std::fill(dst, dst + D, acc(0));
          for (int32_t g = 0; g < G; ++g) {
            load_row(q + qs.offset(b, hk * G + g, i), D, row.data());
            for (int32_t d = 0; d < D; ++d) dst[d] += row[d];
          }
        }
        dot_rows(queries.data(), nr, desc_rows.data(), R, D, scores.data(), R);

        for (int32_t t = 0; t < nr; ++t) {
          const int32_t i = static_cast<int32_t>((r0 + t) / heads_per_row);
          const int32_t hs = shared ? hk : hk * G + static_cast<int32_t>((r0 + t) % heads_per_row);
          const int32_t limit = q_pos ? q_pos[b * Lq + i] : kNoCausalLimit;
          const acc* s = scores.data() + int64_t(t) * R;
          auto score_of = [&](int32_t r) {
            return static_cast<float>(shared ? s[r] / static_cast<acc>(G) : s[r]);
          };
          candidates.clear();
          for (const int32_t r : nonempty) {
            if (layout.position_allows(b, r, limit)) {
              candidates.push_back(selection_key(score_of(r), r));
            }
          }
          const int64_t out_row = ((b * S.sel_heads + hs) * Lq + i) * K;
          write_top_k(candidates, K, idx + out_row, score + out_row);
        }
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
