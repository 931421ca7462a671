// Gathers the key positions a query attends to (fixed tokens, then the tokens
// of its selected regions) into blocks, so the SIMD loops run over up to
// kKeyBlock rows at a time.
#pragma once

#include <cstdint>

#include "../common/layout.h"

namespace gaze::cpu {

constexpr int kKeyBlock = 64;

struct KeyBlock {
  int32_t pos[kKeyBlock];
  int n = 0;

  // flush(positions, count) receives every full block and, from drain(), the rest.
  template <typename Flush>
  void push(int32_t position, Flush&& flush) {
    pos[n++] = position;
    if (n == kKeyBlock) {
      flush(pos, n);
      n = 0;
    }
  }
  template <typename Flush>
  void drain(Flush&& flush) {
    if (n > 0) flush(pos, n);
    n = 0;
  }
};

// Visible fixed tokens of batch element b (-1 padding skipped).
template <typename Flush>
void push_fixed_keys(const LayoutView& layout, int64_t b, int32_t limit, KeyBlock& block,
                     Flush&& flush) {
  const int32_t* fixed = layout.fixed(b);
  for (int32_t j = 0; j < layout.num_fixed; ++j) {
    if (layout.visible(fixed[j], limit)) block.push(fixed[j], flush);
  }
}

// Visible tokens of region r of batch element b.
template <typename Flush>
void push_region_keys(const LayoutView& layout, int64_t b, int32_t r, int32_t limit,
                      KeyBlock& block, Flush&& flush) {
  const int32_t* tokens = layout.tokens(b);
  const RegionSpan span = layout.region(b, r);
  for (int32_t t = span.begin; t < span.end; ++t) {
    if (layout.visible(tokens[t], limit)) block.push(tokens[t], flush);
  }
}

// Visible tokens of the regions listed in `slots` (K entries), by the selection rules.
template <typename Flush>
void push_selected_keys(const LayoutView& layout, int64_t b, const int32_t* slots, int32_t K,
                        int32_t limit, KeyBlock& block, Flush&& flush) {
  SelectionCursor cursor{slots, K};
  for (int32_t r = cursor.advance(layout); r >= 0; r = cursor.advance(layout)) {
    push_region_keys(layout, b, r, limit, block, flush);
  }
}

}  // namespace gaze::cpu
