// Rows grouped by the slot they use (SGMV's segments), built on the host with a
// stable counting sort: O(rows + slots). Rows with slot -1 belong to no segment.
#pragma once
#include <cstdint>
#include <vector>

namespace adapterhub {

struct Segments {
  std::vector<int64_t> rows;   // row ids ordered by slot, ascending within a slot
  std::vector<int64_t> slot;   // slot of segment k
  std::vector<int64_t> start;  // segment k is rows[start[k] .. start[k+1])

  int64_t count() const { return static_cast<int64_t>(slot.size()); }
  int64_t length(int64_t k) const { return start[k + 1] - start[k]; }
  const int64_t* rows_of(int64_t k) const { return rows.data() + start[k]; }
  // True when segment k is the consecutive rows first..first+length-1 (no gather needed).
  bool is_range(int64_t k) const { return rows[start[k + 1] - 1] - rows[start[k]] == length(k) - 1; }
};

inline Segments group_rows_by_slot(const int64_t* index, int64_t rows, int64_t slots) {
  std::vector<int64_t> offset(slots + 1, 0);
  for (int64_t i = 0; i < rows; ++i) {
    if (index[i] >= 0) ++offset[index[i] + 1];
  }
  for (int64_t s = 0; s < slots; ++s) offset[s + 1] += offset[s];
  Segments seg;
  seg.rows.resize(offset[slots]);
  std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
  for (int64_t i = 0; i < rows; ++i) {
    if (index[i] >= 0) seg.rows[fill[index[i]]++] = i;
  }
  for (int64_t s = 0; s < slots; ++s) {
    if (offset[s + 1] > offset[s]) {
      seg.slot.push_back(s);
      seg.start.push_back(offset[s]);
    }
  }
  seg.start.push_back(offset[slots]);
  return seg;
}

}  // namespace adapterhub
