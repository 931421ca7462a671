// CPU gaze_attention forward and backward.
//
// Many query rows (the backward always; the forward from kKeyWalkMinRows rows per head) walk
// keys: a task takes a (batch, KV head)'s rows in chunks and visits each block of keys once
// per chunk, against every row that sees it (KeyBlockWalk). A decode step's few rows walk
// their own keys instead: one task per (batch, KV head, query row), its key blocks split into
// ranges when there are too few tasks for the threads. A task holds the G query heads of the
// KV head's group, so each fixed key row (and, with a shared selection, each region key row)
// is loaded once for all G heads. Keys are gathered in blocks of kKeyBlock positions; the
// forward keeps a base-2 online softmax per head, the backward recomputes the probabilities
// from the saved log-sum-exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "../common/work_split.h"
#include "key_lists.h"
#include "vec_kernels.h"

namespace gaze::cpu {
namespace {

// The keys a query row sees: the fixed tokens for all G heads of the group, then the
// selected regions, for all heads (shared selection) or for each head on its own. Their
// blocks are numbered in that order, so a split of a row's work is a range of blocks.
struct KeyLists {
  std::vector<int32_t> all_heads;               // fixed (+ regions of a shared selection)
  std::vector<std::vector<int32_t>> per_head;   // regions of each head's own selection
  int32_t group = 1;                            // G
  bool shared = true;

  void collect(const AttentionArgs& a, const LayoutView& layout, int64_t b, int32_t kv_head,
               int32_t i, int32_t limit) {
    const AttentionShape& S = a.shape;
    const int32_t K = S.topk;
    const int32_t* idx = a.idx.const_data_ptr<int32_t>();
    auto slots_of = [&](int32_t sel_head) {
      return idx + ((b * S.sel_heads + sel_head) * S.q_len + i) * int64_t(K);
    };
    group = S.group();
    shared = !S.per_head_selection();
    all_heads.clear();
    append_fixed_keys(layout, b, limit, all_heads);
    if (shared) {
      append_selected_keys(layout, b, slots_of(kv_head), K, limit, all_heads);
      return;
    }
    per_head.resize(group);
    for (int32_t g = 0; g < group; ++g) {
      per_head[g].clear();
      append_selected_keys(layout, b, slots_of(kv_head * group + g), K, limit, per_head[g]);
    }
  }

  int64_t blocks() const {
    int64_t n = num_blocks(all_heads);
    if (!shared) {
      for (const auto& keys : per_head) n += num_blocks(keys);
    }
    return n;
  }

  // visit(g0, gc, positions, n, next, next_n) for each of the blocks [first, last), with
  // the heads [g0, g0 + gc) that see it and the block after it in the same list.
  template <typename Visit>
  void visit_blocks(int64_t first, int64_t last, Visit&& visit) const {
    int64_t offset = 0;  // the number of the list's first block
    auto visit_list = [&](const std::vector<int32_t>& keys, int g0, int gc) {
      for_each_block(keys, first - offset, last - offset,
                     [&](const int32_t* pos, int n, const int32_t* next, int next_n) {
                       visit(g0, gc, pos, n, next, next_n);
                     });
      offset += num_blocks(keys);
    };
    visit_list(all_heads, 0, group);
    if (shared) return;
    for (int32_t g = 0; g < group && offset < last; ++g) visit_list(per_head[g], g, 1);
  }
};

// K and V rows of one (batch, KV head) for a block of positions.
template <typename scalar_t>
struct RowGather {
  const scalar_t* k;  // row 0 of the head
  const scalar_t* v;
  int64_t k_stride, v_stride;
  const scalar_t* k_rows[kKeyBlock];
  const scalar_t* v_rows[kKeyBlock];

  void gather(const int32_t* pos, int n) {
    for (int j = 0; j < n; ++j) {
      k_rows[j] = k + pos[j] * k_stride;
      v_rows[j] = v + pos[j] * v_stride;
    }
  }
};

// q, k, v of an attention call, and what every walk of both passes does with them.
template <typename scalar_t>
struct AttentionOperands {
  using acc = acc_t<scalar_t>;
  const scalar_t *q, *k, *v;
  Strides4 qs, ks, vs;
  const int32_t* q_pos;  // [B, Lq] or null
  int32_t G, D, Lq;
  acc q_scale;  // scores in base 2

  explicit AttentionOperands(const AttentionArgs& a)
      : q(a.q.const_data_ptr<scalar_t>()), k(a.k.const_data_ptr<scalar_t>()),
        v(a.v.const_data_ptr<scalar_t>()), qs(strides_of(a.q)), ks(strides_of(a.k)),
        vs(strides_of(a.v)),
        q_pos(a.q_pos.defined() ? a.q_pos.const_data_ptr<int32_t>() : nullptr),
        G(a.shape.group()), D(a.shape.head_dim), Lq(a.shape.q_len),
        q_scale(static_cast<acc>(a.scale) * log2e<acc>()) {}

  int32_t limit(int64_t b, int32_t i) const { return q_pos ? q_pos[b * Lq + i] : kNoCausalLimit; }
  // dst [G, D]: row i of the G query heads of KV head hk, times q_scale
  void load_queries(int64_t b, int32_t hk, int32_t i, acc* dst) const {
    for (int32_t g = 0; g < G; ++g) {
      load_row(q + qs.offset(b, hk * G + g, i), D, dst + g * D);
      scale(dst + g * D, D, q_scale);
    }
  }
  RowGather<scalar_t> head_rows(int64_t b, int32_t hk) const {
    return {k + ks.offset(b, hk, 0), v + vs.offset(b, hk, 0), ks.row, vs.row, {}, {}};
  }
};

// The forward's operands: with its outputs.
template <typename scalar_t>
struct ForwardOperands : AttentionOperands<scalar_t> {
  using acc = acc_t<scalar_t>;
  scalar_t* out;  // [B, Hq, Lq, D] contiguous
  acc* lse;       // [B, Hq, Lq]

  ForwardOperands(const AttentionArgs& a, at::Tensor& out_t, at::Tensor& lse_t)
      : AttentionOperands<scalar_t>(a), out(out_t.data_ptr<scalar_t>()),
        lse(lse_t.data_ptr<acc>()) {}

  // out and lse of row `row` of [B, Hq, Lq] from its softmax state
  void store(int64_t row, const acc* accum, acc max, acc sum) const {
    store_row(accum, this->D, softmax_normalizer(sum), out + row * this->D);
    lse[row] = softmax_lse(max, sum);
  }
};

// A block of base-2 scores of gc rows ([gc, kKeyBlock], n keys) into their online softmax:
// each row's max and sum updated and its accumulator [D] rescaled, the scores turned into
// weights relative to the new max, for accumulate_rows.
template <typename acc>
void softmax_block(acc* scores, int gc, int n, int D, acc* row_max, acc* row_sum, acc* accum) {
  for (int g = 0; g < gc; ++g) {
    acc* sg = scores + g * kKeyBlock;
    const acc new_max = std::max(row_max[g], max_value(sg, n));
    const acc rescale = softmax_rescale(row_max[g], new_max);
    if (rescale != acc(1)) {
      scale(accum + g * D, D, rescale);
      row_sum[g] *= rescale;
    }
    row_sum[g] += exp2_shifted(sg, n, softmax_safe_max(new_max));
    row_max[g] = new_max;
  }
}

// Key-major walks (the backward, and the forward of many rows): a chunk of query rows of one
// (batch, KV head) inverts its selections (which rows took each region) and visits each
// block of up to kKeyBlock keys once, running every row that sees it against it: the
// block's K/V rows (and the backward's dK/dV sums) stay in cache, where a walk of each row's
// own keys reads them again for every row.
//
// A block's positions are sorted, so the keys a row sees (positions <= its causal limit)
// are a prefix of the block. A key listed twice (in two regions, twice in a region, a region
// taken twice) is visited twice, as a row's own list holds it twice.

// Keys are dealt to the backward's parts by runs of kPartRun positions, in turn: each part
// holds keys from everywhere in the sequence, and each dK/dV row has one writer.
constexpr int32_t kPartRun = 16;

// A chunk's buffers of its rows, in cache beside the key block the rows run against.
constexpr int64_t kChunkBytes = int64_t(2) << 20;

// A row of the chunk and the heads of its group that see a key block: all G for fixed
// tokens and shared selections, one for a query head's own selection.
struct RowVisit {
  int32_t row;  // in the chunk
  int32_t g0, gc;
};

struct KeyBlockWalk {
  // visits of region r at visits[first[r], first[r + 1]), one per taken slot, rows ascending
  std::vector<int64_t> first;  // [R + 1]
  std::vector<RowVisit> visits;
  std::vector<int32_t> keys;   // the current region's or the fixed tokens' positions

  // For rows [i0, i0 + rows) of batch element b and KV head hk (limits[r]: row r's causal
  // limit), each block of the keys with keep(pos): block(pos, n, for_each_visit), where
  // for_each_visit(visit) calls visit(w, m) for each row visit w that sees the first m > 0
  // keys. The fixed tokens first (every row, all G heads), then each region some row took.
  template <typename Keep, typename Block>
  void run(const AttentionArgs& a, const LayoutView& layout, int64_t b, int32_t hk, int32_t i0,
           int32_t rows, const int32_t* limits, Keep keep, Block&& block) {
    const AttentionShape& S = a.shape;
    const int32_t G = S.group();
    auto run_keys = [&](auto&& for_each_row) {
      std::sort(keys.begin(), keys.end());
      for (size_t j0 = 0; j0 < keys.size(); j0 += kKeyBlock) {
        const int n = static_cast<int>(std::min<size_t>(kKeyBlock, keys.size() - j0));
        const int32_t* pos = keys.data() + j0;
        block(pos, n, [&](auto&& visit) {
          for_each_row([&](const RowVisit& w) {
            const int m = static_cast<int>(std::upper_bound(pos, pos + n, limits[w.row]) - pos);
            if (m > 0) visit(w, m);
          });
        });
      }
    };
    keys.clear();
    const int32_t* fixed = layout.fixed(b);
    for (int32_t j = 0; j < layout.num_fixed; ++j) {
      if (keep(fixed[j])) keys.push_back(fixed[j]);
    }
    run_keys([&](auto&& visit) {
      for (int32_t r = 0; r < rows; ++r) visit(RowVisit{r, 0, G});
    });

    // per-head selection: a row's regions differ between the heads of a group
    const bool shared = !S.per_head_selection();
    if (shared) {  // selection head hk (Hs = Hkv, or Hs = Hq = Hkv)
      invert_selections(a, layout, b, i0, rows, hk, 1);
    } else {
      invert_selections(a, layout, b, i0, rows, hk * G, G);
    }
    const int32_t* tokens = layout.tokens(b);
    for (int32_t region = 0; region < layout.num_regions; ++region) {
      const int64_t v0 = first[region], v1 = first[region + 1];
      if (v0 == v1) continue;
      keys.clear();
      const RegionSpan span = layout.region(b, region);
      for (int32_t t = span.begin; t < span.end; ++t) {
        if (keep(tokens[t])) keys.push_back(tokens[t]);
      }
      run_keys([&](auto&& visit) {
        for (int64_t x = v0; x < v1; ++x) visit(visits[x]);
      });
    }
  }

  // first and visits for selection heads [sel0, sel0 + heads): one head's selection shared by
  // the group's G query heads, or G heads' own (a counting sort by region).
  void invert_selections(const AttentionArgs& a, const LayoutView& layout, int64_t b, int32_t i0,
                         int32_t rows, int32_t sel0, int32_t heads) {
    const AttentionShape& S = a.shape;
    const int32_t K = S.topk, R = layout.num_regions;
    const int32_t* idx = a.idx.const_data_ptr<int32_t>();
    auto for_each_taken = [&](auto&& take) {
      for (int32_t r = 0; r < rows; ++r) {
        for (int32_t h = 0; h < heads; ++h) {
          const int64_t query = (b * S.sel_heads + sel0 + h) * S.q_len + i0 + r;
          const int32_t* slots = idx + query * K;
          for (int32_t s = 0; s < K; ++s) {
            if (slot_taken(layout, slots, s)) take(slots[s], r, h);
          }
        }
      }
    };
    first.assign(size_t(R) + 1, 0);
    for_each_taken([&](int32_t region, int32_t, int32_t) { ++first[region + 1]; });
    for (int32_t r = 0; r < R; ++r) first[r + 1] += first[r];
    visits.resize(size_t(first[R]));
    std::vector<int64_t>& next = first;  // filled front to back, then shifted back below
    for_each_taken([&](int32_t region, int32_t row, int32_t h) {
      visits[next[region]++] = heads == 1 ? RowVisit{row, 0, S.group()} : RowVisit{row, h, 1};
    });
    for (int32_t r = R; r > 0; --r) first[r] = first[r - 1];
    first[0] = 0;
  }
};

// Visits of a key block that share its prefix m, stacked into up to kRows query rows: the
// SIMD kernels work on four query rows at a time (dot_rows' 4 x 4 tiles, accumulate_rows'
// and scatter_rows' four heads), so visits of fewer heads (a query head's own selection,
// groups of G < 4) run together instead of one by one. A flush copies the visitors' rows
// into contiguous buffers and their results back: a few row copies per visit, against
// 2 m D multiply-adds per row.
struct VisitStack {
  static constexpr int kRows = 8;
  RowVisit visits[kRows];
  int count = 0, rows = 0, m = 0;

  // Whether visits of gc heads gain from stacking (a visit of four or more heads fills
  // the kernels' tiles on its own).
  static bool helps(int gc) { return gc < 4; }

  // Adds visit w of the block's first wm keys; flush(stack) runs the stack first when w
  // does not fit it, or names a head of a row already in it (a region the row took twice:
  // the forward's second visit must see the softmax state the first one left).
  template <typename Flush>
  void add(const RowVisit& w, int wm, Flush&& flush) {
    if (count > 0 && (wm != m || rows + w.gc > kRows || holds(w))) finish(flush);
    visits[count++] = w;
    rows += w.gc;
    m = wm;
  }

  bool holds(const RowVisit& w) const {
    for (int x = 0; x < count; ++x) {
      const RowVisit& v = visits[x];
      if (v.row == w.row && v.g0 < w.g0 + w.gc && w.g0 < v.g0 + v.gc) return true;
    }
    return false;
  }

  // f(state, at, gc) for each visit: its first row of a chunk's [rows, G] state
  // (row * G + g0), the first of its gc rows in the stack
  template <typename F>
  void for_each(int32_t G, F&& f) const {
    int at = 0;
    for (int x = 0; x < count; ++x) {
      f(int64_t(visits[x].row) * G + visits[x].g0, at, visits[x].gc);
      at += visits[x].gc;
    }
  }

  template <typename Flush>
  void finish(Flush&& flush) {
    if (count > 0) flush(*this);
    count = rows = 0;
  }
};

// A decode step has few (batch, KV head, query row) tasks. With fewer than the threads, or
// a count that leaves threads idle in the last round, each task's key blocks are split and
// the splits' online-softmax states merged by log-sum-exp, as the CUDA split-K forward does.
// Splits of at least kMinSplitKeys keys (estimated from the layout), so that the merge stays
// small beside the rows read. The result's rounding thus follows the thread count.
constexpr int64_t kMinSplitKeys = 512;

int64_t plan_forward_splits(const AttentionArgs& a, int64_t tasks) {
  const AttentionShape& S = a.shape;
  const bool per_head = S.per_head_selection();
  const int64_t region_keys =  // per region, on average
      a.layout.region_tokens.size(-1) / std::max<int64_t>(1, a.layout.num_regions);
  const int64_t keys = a.layout.fixed_tokens.size(-1) +
                       int64_t(S.topk) * (per_head ? S.group() : 1) * region_keys;
  return pieces_filling_rounds(tasks, at::get_num_threads(), keys / kMinSplitKeys);
}

// Query rows per (batch, KV head) from which the forward walks keys; fewer walk each row's
// own keys, with the splits a decode step needs. Chunks cut to fill the threads keep at
// least kMinChunkRows rows.
constexpr int32_t kKeyWalkMinRows = 8;
constexpr int32_t kMinChunkRows = 4;

// The forward of many rows: one task per (batch, KV head, chunk of rows), each key block
// once per chunk (KeyBlockWalk), each row's online softmax kept in the chunk's state.
template <typename scalar_t>
void attention_forward_by_keys(const AttentionArgs& a, const LayoutView& layout,
                               const ForwardOperands<scalar_t>& io) {
  using acc = acc_t<scalar_t>;
  const AttentionShape& S = a.shape;
  const int32_t G = io.G, D = io.D, Lq = io.Lq;

  // Chunks: enough to keep the threads busy (pieces_filling_rounds), each chunk's queries
  // and accumulators ([rows, G, D] each) within kChunkBytes.
  const int64_t heads = int64_t(S.batch) * S.kv_heads;
  const int64_t row_bytes = std::max<int64_t>(1, int64_t(2) * G * D * int64_t(sizeof(acc)));
  const int64_t chunks = std::max(
      pieces_filling_rounds(heads, at::get_num_threads(), Lq / kMinChunkRows),
      (Lq * row_bytes + kChunkBytes - 1) / kChunkBytes);
  const int32_t chunk_rows = static_cast<int32_t>((Lq + chunks - 1) / chunks);

  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> queries(size_t(chunk_rows) * G * D), accum(queries.size());
    std::vector<acc> row_max(size_t(chunk_rows) * G), row_sum(row_max.size());
    std::vector<acc> scores(size_t(std::max<int32_t>(G, VisitStack::kRows)) * kKeyBlock);
    std::vector<int32_t> limit(chunk_rows);
    // a stack's rows: queries and online-softmax states [kRows, D], max and sum [kRows]
    constexpr int kStack = VisitStack::kRows;
    std::vector<acc> stack_queries(size_t(kStack) * D), stack_accum(stack_queries.size());
    acc stack_max[kStack], stack_sum[kStack];
    RowGather<scalar_t> rows;
    KeyBlockWalk walk;
    VisitStack stack;
    // gc query rows [gc, D] and their softmax states (max, sum [gc], accumulators [gc, D])
    // against the block's first m keys (gathered in `rows`)
    auto attend = [&](const acc* q_rows, int gc, int m, acc* max, acc* sum, acc* accum_rows) {
      dot_rows(q_rows, gc, rows.k_rows, m, D, scores.data(), kKeyBlock);
      softmax_block(scores.data(), gc, m, D, max, sum, accum_rows);
      accumulate_rows(scores.data(), kKeyBlock, gc, rows.v_rows, m, D, accum_rows);
    };
    auto flush = [&](const VisitStack& st) {
      st.for_each(G, [&](int64_t stat, int at, int gc) {
        std::copy_n(queries.data() + stat * D, gc * D, stack_queries.data() + at * D);
        std::copy_n(accum.data() + stat * D, gc * D, stack_accum.data() + at * D);
        std::copy_n(row_max.data() + stat, gc, stack_max + at);
        std::copy_n(row_sum.data() + stat, gc, stack_sum + at);
      });
      attend(stack_queries.data(), st.rows, st.m, stack_max, stack_sum, stack_accum.data());
      st.for_each(G, [&](int64_t stat, int at, int gc) {
        std::copy_n(stack_accum.data() + at * D, gc * D, accum.data() + stat * D);
        std::copy_n(stack_max + at, gc, row_max.data() + stat);
        std::copy_n(stack_sum + at, gc, row_sum.data() + stat);
      });
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / chunks;
      const int64_t b = head / S.kv_heads;
      const int32_t hk = static_cast<int32_t>(head % S.kv_heads);
      const int64_t first_row = task % chunks * chunk_rows;  // 64-bit: past Lq for late chunks
      if (first_row >= Lq) continue;
      const int32_t i0 = static_cast<int32_t>(first_row);
      const int32_t n_rows = std::min(chunk_rows, Lq - i0);
      for (int32_t r = 0; r < n_rows; ++r) {
        limit[r] = io.limit(b, i0 + r);
        io.load_queries(b, hk, i0 + r, queries.data() + int64_t(r) * G * D);
      }
      std::fill(accum.begin(), accum.end(), acc(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc(0));

      rows = io.head_rows(b, hk);
      auto valid = [&](int32_t pos) { return layout.visible(pos, kNoCausalLimit); };
      walk.run(a, layout, b, hk, i0, n_rows, limit.data(), valid,
               [&](const int32_t* pos, int n, auto&& for_each_visit) {
        rows.gather(pos, n);
        for_each_visit([&](const RowVisit& w, int m) {
          if (VisitStack::helps(w.gc)) return stack.add(w, m, flush);
          const int64_t stat = int64_t(w.row) * G + w.g0;
          attend(queries.data() + stat * D, w.gc, m, row_max.data() + stat,
                 row_sum.data() + stat, accum.data() + stat * D);
        });
        stack.finish(flush);
      });

      for (int32_t r = 0; r < n_rows; ++r) {
        for (int32_t g = 0; g < G; ++g) {
          const int64_t stat = int64_t(r) * G + g;
          const int64_t row = (b * S.q_heads + hk * G + g) * int64_t(Lq) + i0 + r;
          io.store(row, accum.data() + stat * D, row_max[stat], row_sum[stat]);
        }
      }
    }
  });
}

template <typename scalar_t>
void attention_forward(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  const AttentionShape& S = a.shape;
  const int32_t G = S.group(), D = S.head_dim, Lq = S.q_len;
  const LayoutView layout = a.layout.view(a.num_keys);
  const ForwardOperands<scalar_t> io(a, out, lse);

  const int64_t tasks = int64_t(S.batch) * S.kv_heads * Lq;
  const int64_t splits = plan_forward_splits(a, tasks);
  if (splits == 1 && Lq >= kKeyWalkMinRows) return attention_forward_by_keys(a, layout, io);
  // With splits: each split's state per head, [tasks, splits, G, D + 2] (accumulator, max, sum)
  const int64_t state_size = int64_t(G) * (D + 2);
  at::Tensor states;
  if (splits > 1) states = at::empty({tasks, splits, state_size}, lse.options());
  acc* state_data = splits > 1 ? states.data_ptr<acc>() : nullptr;
  struct Task {
    int64_t b;
    int32_t hk, i;  // KV head, query row
  };
  auto task_of = [&](int64_t task) {
    return Task{task / (int64_t(S.kv_heads) * Lq), static_cast<int32_t>((task / Lq) % S.kv_heads),
                static_cast<int32_t>(task % Lq)};
  };
  auto out_row = [&](const Task& t, int32_t g) {  // row of out [B, Hq, Lq] for head g of the group
    return (t.b * S.q_heads + t.hk * G + g) * int64_t(Lq) + t.i;
  };

  at::parallel_for(0, tasks * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> queries(G * D), accum(G * D), scores(G * kKeyBlock);
    std::vector<acc> row_max(G), row_sum(G);
    RowGather<scalar_t> rows;
    KeyLists lists;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits;
      const Task t = task_of(item / splits);
      const int64_t b = t.b;
      const int32_t hk = t.hk, i = t.i;
      const int32_t limit = io.limit(b, i);
      io.load_queries(b, hk, i, queries.data());
      std::fill(accum.begin(), accum.end(), acc(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc(0));

      rows = io.head_rows(b, hk);
      auto attend = [&](int g0, int gc, const int32_t* pos, int n, const int32_t* next,
                        int next_n) {
        rows.gather(pos, n);
        for (int j = 0; j < next_n; ++j) {
          touch_row_start(rows.k + int64_t(next[j]) * rows.k_stride);
          touch_row_start(rows.v + int64_t(next[j]) * rows.v_stride);
        }
        acc* s = scores.data() + g0 * kKeyBlock;
        dot_rows(queries.data() + g0 * D, gc, rows.k_rows, n, D, s, kKeyBlock);
        softmax_block(s, gc, n, D, row_max.data() + g0, row_sum.data() + g0, accum.data() + g0 * D);
        accumulate_rows(s, kKeyBlock, gc, rows.v_rows, n, D, accum.data() + g0 * D);
      };
      lists.collect(a, layout, b, hk, i, limit);
      const int64_t blocks = lists.blocks();
      lists.visit_blocks(blocks * split / splits, blocks * (split + 1) / splits, attend);

      if (splits > 1) {
        acc* state = state_data + item * state_size;
        std::copy(accum.begin(), accum.end(), state);
        std::copy(row_max.begin(), row_max.end(), state + G * D);
        std::copy(row_sum.begin(), row_sum.end(), state + G * (D + 1));
        continue;
      }
      for (int32_t g = 0; g < G; ++g) {
        const int64_t row = out_row(t, g);
        io.store(row, accum.data() + g * D, row_max[g], row_sum[g]);
      }
    }
  });
  if (splits == 1) return;

  // out = sum_s w_s acc_s / sum_s w_s l_s, w_s = softmax_split_weight(m_s, max_s m_s)
  at::parallel_for(0, tasks * G, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> merged(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t task = item / G;
      const int32_t g = static_cast<int32_t>(item % G);
      const acc* first = state_data + task * splits * state_size;
      auto split_max = [&](int64_t s) { return first[s * state_size + G * D + g]; };
      auto split_sum = [&](int64_t s) { return first[s * state_size + G * (D + 1) + g]; };
      acc max = -std::numeric_limits<acc>::infinity();
      for (int64_t s = 0; s < splits; ++s) max = std::max(max, split_max(s));
      const acc safe_max = softmax_safe_max(max);
      acc sum = 0;
      std::fill(merged.begin(), merged.end(), acc(0));
      for (int64_t s = 0; s < splits; ++s) {
        const acc w = softmax_split_weight(split_max(s), safe_max);
        sum += w * split_sum(s);
        const acc* split_acc = first + s * state_size + g * D;
        for (int32_t d = 0; d < D; ++d) merged[d] += w * split_acc[d];
      }
      const int64_t row = out_row(task_of(task), g);
      io.store(row, merged.data(), max, sum);
    }
  });
}

template <typename scalar_t>
void attention_backward(const AttentionBackwardArgs& args, at::Tensor& dq, at::Tensor& dk_acc,
                        at::Tensor& dv_acc) {
  using acc = acc_t<scalar_t>;
  const AttentionArgs& a = args.fwd;
  const AttentionShape& S = a.shape;
  const int32_t G = S.group(), D = S.head_dim, Lq = S.q_len;
  const int64_t N = a.num_keys;
  const LayoutView layout = a.layout.view(N);
  const AttentionOperands<scalar_t> io(a);
  const scalar_t* dout = args.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* out = args.out.const_data_ptr<scalar_t>();
  const acc* lse = args.lse.const_data_ptr<acc>();
  const acc* dlse = args.grad_lse.defined() ? args.grad_lse.const_data_ptr<acc>() : nullptr;
  const Strides4 dos = strides_of(args.grad_out), os = strides_of(args.out);
  scalar_t* dq_data = dq.data_ptr<scalar_t>();
  acc* dk_data = dk_acc.data_ptr<acc>();
  acc* dv_data = dv_acc.data_ptr<acc>();
  // dK = sum dS (q scale) = sum dS q_scaled / log2(e): the scaled queries serve both
  const acc dk_scale = acc(1) / log2e<acc>();

  // Tasks: (batch, KV head, part of the key positions). Where the heads leave threads idle
  // (pieces_filling_rounds), a head's keys are split among parts; each part adds its keys'
  // share of dq into its own float copy, summed in part order at the end: the same
  // gradients on every run for a given thread count.
  const int64_t heads = int64_t(S.batch) * S.kv_heads;
  const int64_t dq_elems = int64_t(S.batch) * S.q_heads * Lq * D;
  constexpr int64_t kDqCopiesBudget = int64_t(256) << 20;  // bytes, all parts' copies
  const int64_t most_parts = std::min<int64_t>(
      {(N + kPartRun - 1) / kPartRun,
       kDqCopiesBudget / std::max<int64_t>(1, dq_elems * int64_t(sizeof(acc)))});
  const int64_t parts = pieces_filling_rounds(heads, at::get_num_threads(), most_parts);
  at::Tensor dq_parts;  // [parts, B, Hq, Lq, D]
  if (parts > 1) dq_parts = at::empty({parts, dq_elems}, dk_acc.options());
  acc* dq_parts_data = parts > 1 ? dq_parts.data_ptr<acc>() : nullptr;

  // Query rows per chunk: their scaled q, dO and dq ([rows, G, D] each) within kChunkBytes.
  const int32_t chunk_rows = static_cast<int32_t>(std::clamp<int64_t>(
      kChunkBytes / std::max<int64_t>(1, int64_t(3) * G * D * int64_t(sizeof(acc))), 1,
      std::max(Lq, 1)));

  at::parallel_for(0, heads * parts, 1, [&](int64_t begin, int64_t end) {
    // the chunk's rows: q * scale * log2(e), dO, dq (unscaled), [chunk_rows, G, D]
    std::vector<acc> q_scaled(size_t(chunk_rows) * G * D), grad(q_scaled.size()),
        dq_sum(q_scaled.size());
    std::vector<acc> lse2(size_t(chunk_rows) * G), delta(lse2.size()), out_row(D);
    std::vector<int32_t> limit(chunk_rows);
    // the key block's dK and dV sums [kKeyBlock, D], P and dS [G, kKeyBlock]
    std::vector<acc> dk_sum(size_t(kKeyBlock) * D), dv_sum(dk_sum.size());
    std::vector<acc> probs(size_t(std::max<int32_t>(G, VisitStack::kRows)) * kKeyBlock),
        dscores(probs.size());
    // a stack's rows: scaled q, dO and dq [kRows, D], lse2 and delta [kRows]
    constexpr int kStack = VisitStack::kRows;
    std::vector<acc> stack_q(size_t(kStack) * D), stack_grad(stack_q.size()), stack_dq(stack_q.size());
    acc stack_lse2[kStack], stack_delta[kStack];
    VisitStack stack;
    acc* dk_rows[kKeyBlock];
    acc* dv_rows[kKeyBlock];
    for (int j = 0; j < kKeyBlock; ++j) {
      dk_rows[j] = dk_sum.data() + int64_t(j) * D;
      dv_rows[j] = dv_sum.data() + int64_t(j) * D;
    }
    RowGather<scalar_t> rows;
    KeyBlockWalk walk;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / parts, part = task % parts;
      const int64_t b = head / S.kv_heads;
      const int32_t hk = static_cast<int32_t>(head % S.kv_heads);
      rows = io.head_rows(b, hk);
      acc* dk_head = dk_data + head * N * D;
      acc* dv_head = dv_data + head * N * D;
      // the keys of this part: valid positions whose run is dealt to it
      auto in_part = [&](int32_t pos) {
        return layout.visible(pos, kNoCausalLimit) && (pos / kPartRun) % parts == part;
      };

      for (int64_t first_row = 0; first_row < Lq; first_row += chunk_rows) {  // 64-bit: no wrap
        const int32_t i0 = static_cast<int32_t>(first_row);
        const int32_t n_rows = std::min(chunk_rows, Lq - i0);
        for (int32_t r = 0; r < n_rows; ++r) {
          const int32_t i = i0 + r;
          limit[r] = io.limit(b, i);
          io.load_queries(b, hk, i, q_scaled.data() + int64_t(r) * G * D);
          for (int32_t g = 0; g < G; ++g) {
            const int32_t h = hk * G + g;
            const int64_t lrow = (b * S.q_heads + h) * int64_t(Lq) + i;
            acc* gr = grad.data() + (int64_t(r) * G + g) * D;
            load_row(dout + dos.offset(b, h, i), D, gr);
            load_row(out + os.offset(b, h, i), D, out_row.data());
            acc dot = 0;
            for (int32_t d = 0; d < D; ++d) dot += gr[d] * out_row[d];
            delta[r * G + g] = dot - (dlse ? dlse[lrow] : acc(0));
            lse2[r * G + g] = lse[lrow] * log2e<acc>();
          }
        }
        std::fill(dq_sum.begin(), dq_sum.end(), acc(0));

        // gc rows (scaled q, dO [gc, D], lse2, delta [gc]) against the block's first m keys
        // (gathered in `rows`): their dq [gc, D] and the block's dK/dV sums.
        auto attend = [&](const acc* q_rows, const acc* grad_rows, const acc* row_lse2,
                          const acc* row_delta, int gc, int m, acc* dq_rows) {
          dot_rows(q_rows, gc, rows.k_rows, m, D, probs.data(), kKeyBlock);
          dot_rows(grad_rows, gc, rows.v_rows, m, D, dscores.data(), kKeyBlock);
          for (int g = 0; g < gc; ++g) {
            acc* p = probs.data() + g * kKeyBlock;
            acc* ds = dscores.data() + g * kKeyBlock;
            // A row with lse = -inf saw no key in the forward: it gets no gradient (P = dS =
            // 0, also where delta is NaN).
            if (row_lse2[g] == -std::numeric_limits<acc>::infinity()) {
              std::fill(p, p + m, acc(0));
              std::fill(ds, ds + m, acc(0));
              continue;
            }
            exp2_shifted(p, m, row_lse2[g]);
            for (int j = 0; j < m; ++j) ds[j] = p[j] * (ds[j] - row_delta[g]);
          }
          accumulate_rows(dscores.data(), kKeyBlock, gc, rows.k_rows, m, D, dq_rows);
          scatter_rows(dscores.data(), kKeyBlock, gc, q_rows, dk_rows, m, D);
          scatter_rows(probs.data(), kKeyBlock, gc, grad_rows, dv_rows, m, D);
        };
        auto flush = [&](const VisitStack& st) {
          st.for_each(G, [&](int64_t stat, int at, int gc) {
            std::copy_n(q_scaled.data() + stat * D, gc * D, stack_q.data() + at * D);
            std::copy_n(grad.data() + stat * D, gc * D, stack_grad.data() + at * D);
            std::copy_n(lse2.data() + stat, gc, stack_lse2 + at);
            std::copy_n(delta.data() + stat, gc, stack_delta + at);
          });
          std::fill_n(stack_dq.data(), int64_t(st.rows) * D, acc(0));
          attend(stack_q.data(), stack_grad.data(), stack_lse2, stack_delta, st.rows, st.m,
                 stack_dq.data());
          st.for_each(G, [&](int64_t stat, int at, int gc) {
            acc* dq_rows = dq_sum.data() + stat * D;
            for (int64_t e = 0; e < int64_t(gc) * D; ++e) dq_rows[e] += stack_dq[at * D + e];
          });
        };
        auto run_visit = [&](const RowVisit& w, int m) {
          if (VisitStack::helps(w.gc)) return stack.add(w, m, flush);
          const int64_t stat = int64_t(w.row) * G + w.g0;
          attend(q_scaled.data() + stat * D, grad.data() + stat * D, lse2.data() + stat,
                 delta.data() + stat, w.gc, m, dq_sum.data() + stat * D);
        };
        walk.run(a, layout, b, hk, i0, n_rows, limit.data(), in_part,
                 [&](const int32_t* pos, int n, auto&& for_each_visit) {
          rows.gather(pos, n);
          std::fill_n(dk_sum.data(), int64_t(n) * D, acc(0));
          std::fill_n(dv_sum.data(), int64_t(n) * D, acc(0));
          for_each_visit(run_visit);
          stack.finish(flush);
          for (int j = 0; j < n; ++j) {
            acc* dk_row = dk_head + int64_t(pos[j]) * D;
            acc* dv_row = dv_head + int64_t(pos[j]) * D;
            for (int32_t d = 0; d < D; ++d) {
              dk_row[d] += dk_rows[j][d] * dk_scale;
              dv_row[d] += dv_rows[j][d];
            }
          }
        });

        for (int32_t r = 0; r < n_rows; ++r) {
          for (int32_t g = 0; g < G; ++g) {
            const int64_t row_index = (b * S.q_heads + hk * G + g) * int64_t(Lq) + i0 + r;
            const acc* sum = dq_sum.data() + (int64_t(r) * G + g) * D;
            if (parts == 1) {
              store_row(sum, D, static_cast<acc>(a.scale), dq_data + row_index * D);
            } else {
              std::copy_n(sum, D, dq_parts_data + part * dq_elems + row_index * D);
            }
          }
        }
      }
    }
  });
  if (parts == 1) return;
  at::parallel_for(0, dq_elems / std::max(D, 1), 64, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(D);
    for (int64_t row_index = begin; row_index < end; ++row_index) {
      std::fill(sum.begin(), sum.end(), acc(0));
      for (int64_t part = 0; part < parts; ++part) {
        const acc* src = dq_parts_data + part * dq_elems + row_index * D;
        for (int32_t d = 0; d < D; ++d) sum[d] += src[d];
      }
      store_row(sum.data(), D, static_cast<acc>(a.scale), dq_data + row_index * D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gaze_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& region_ptr,
    const at::Tensor& region_tokens, const at::Tensor& fixed_tokens, const at::Tensor& idx,
    const std::optional<at::Tensor>& q_pos, double scale) {
  AttentionArgs args = prepare_gaze_attention("gaze_attention", q, k, v, region_ptr,
                                              region_tokens, fixed_tokens, idx, q_pos, scale);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype));
  dispatch_cpu_float_types(q.scalar_type(), "gaze_attention", [&](auto tag) {
    attention_forward<decltype(tag)>(args, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaze_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& region_ptr, const at::Tensor& region_tokens,
    const at::Tensor& fixed_tokens, const at::Tensor& idx,
    const std::optional<at::Tensor>& q_pos, double scale) {
  AttentionBackwardArgs args = prepare_gaze_attention_backward(
      grad_out, grad_lse, q, k, v, out, lse, region_ptr, region_tokens, fixed_tokens, idx, q_pos,
      scale);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(acc_dtype));
  at::Tensor dv = at::zeros(v.sizes(), v.options().dtype(acc_dtype));
  dispatch_cpu_float_types(q.scalar_type(), "gaze_attention_backward", [&](auto tag) {
    attention_backward<decltype(tag)>(args, dq, dk, dv);
  });
  return {dq, dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace
}  // namespace gaze::cpu

TORCH_LIBRARY_IMPL(gaze, CPU, m) {
  m.impl("gaze_attention", &gaze::cpu::gaze_attention_cpu);
  m.impl("gaze_attention_backward", &gaze::cpu::gaze_attention_backward_cpu);
}
