// How finely to split equal work items so that their pieces keep every worker busy: shared by
// the CUDA split-K plan (workers: resident blocks) and the CPU kernels (workers: threads).
#pragma once

#include <algorithm>
#include <cstdint>

namespace gaze {

// The pieces per item for `items` equal items run `slots` at a time. A last, partial round
// leaves most slots idle for a whole piece's time (17 splits x 64 units = 1,088 blocks for
// 1,056 resident on an H100: a second round of 32), so the count whose rounds are fullest
// wins; of those within 10% of the best fill the fewest, as more pieces mean shorter runs
// and more partial results to merge. At most `most` pieces (at least 1).
inline int64_t pieces_filling_rounds(int64_t items, int64_t slots, int64_t most) {
  items = std::max<int64_t>(items, 1);
  slots = std::max<int64_t>(slots, 1);
  most = std::max<int64_t>(most, 1);
  auto fill = [&](int64_t pieces) {  // the share of the rounds' slots used
    const int64_t n = items * pieces;
    return double(n) / double((n + slots - 1) / slots * slots);
  };
  double best = 0.0;
  for (int64_t p = 1; p <= most; ++p) best = std::max(best, fill(p));
  int64_t pieces = 1;
  while (pieces < most && fill(pieces) < 0.9 * best) ++pieces;
  return pieces;
}

}  // namespace gaze
