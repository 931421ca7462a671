// The key positions a query attends to (fixed tokens, then the tokens of its
// selected regions), collected into a list and walked in blocks, so the SIMD
// loops run over up to kKeyBlock rows at a time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/layout.h"

namespace gaze::cpu {

constexpr int kKeyBlock = 64;

// Visible fixed tokens of batch element b (-1 padding skipped).
inline void append_fixed_keys(const LayoutView& layout, int64_t b, int32_t limit,
                              std::vector<int32_t>& out) {
  const int32_t* fixed = layout.fixed(b);
  for (int32_t j = 0; j < layout.num_fixed; ++j) {
    if (layout.visible(fixed[j], limit)) out.push_back(fixed[j]);
  }
}

// Visible tokens of region r of batch element b.
inline void append_region_keys(const LayoutView& layout, int64_t b, int32_t r, int32_t limit,
                               std::vector<int32_t>& out) {
  const int32_t* tokens = layout.tokens(b);
  const RegionSpan span = layout.region(b, r);
  for (int32_t t = span.begin; t < span.end; ++t) {
    if (layout.visible(tokens[t], limit)) out.push_back(tokens[t]);
  }
}

// Visible tokens of the regions listed in `slots` (K entries), by the selection rules.
inline void append_selected_keys(const LayoutView& layout, int64_t b, const int32_t* slots,
                                 int32_t K, int32_t limit, std::vector<int32_t>& out) {
  for (int32_t s = 0; s < K; ++s) {
    if (slot_taken(layout, slots, s)) append_region_keys(layout, b, slots[s], limit, out);
  }
}

inline int64_t num_blocks(const std::vector<int32_t>& keys) {
  return (int64_t(keys.size()) + kKeyBlock - 1) / kKeyBlock;
}

// visit(positions, n, next, next_n) over the consecutive blocks [first, last) of `keys`
// (clamped to its blocks); `next` is the block after this one (next_n = 0 at the end).
template <typename Visit>
void for_each_block(const std::vector<int32_t>& keys, int64_t first, int64_t last,
                    Visit&& visit) {
  // 64-bit offsets: a row whose selection names one huge region in many slots can list
  // more than 2^31 keys; only a block's own counts (<= kKeyBlock) are int
  const int64_t n = int64_t(keys.size());
  const int64_t end = std::min(last, num_blocks(keys));
  for (int64_t block = std::max<int64_t>(first, 0); block < end; ++block) {
    const int64_t j = block * kKeyBlock;
    const int64_t next = std::min<int64_t>(j + kKeyBlock, n);
    visit(keys.data() + j, int(next - j), keys.data() + next,
          int(std::min<int64_t>(n - next, kKeyBlock)));
  }
}

template <typename Visit>
void for_each_block(const std::vector<int32_t>& keys, Visit&& visit) {
  for_each_block(keys, 0, num_blocks(keys), visit);
}

// Touches the first two cache lines of a row. Done for the rows of the next
// block, it lets the hardware prefetcher bring in the rest while this block is
// computed: 7% faster on the decode benchmark, where fetching whole rows or
// one line measured slower. (A volatile asm: GCC deletes loops whose only
// effect is __builtin_prefetch.)
inline void touch_row_start(const void* row) {
  const char* p = static_cast<const char*>(row);
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
  asm volatile("prefetcht0 %0" : : "m"(*(p + 64)));
#else
  __builtin_prefetch(p, 0, 3);
  __builtin_prefetch(p + 64, 0, 3);
#endif
}

}  // namespace gaze::cpu
