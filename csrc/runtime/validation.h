// The request contract's check stage in C++: the mirror of the check_* methods of
// speeder_rt/runtime/validation.py (RequestContract), check for check, in the same order and with the same
// messages, so that the C++ runtime, its binding and the Python runtimes refuse a request alike. The parse stage
// (types and shapes) has no counterpart here: C++ callers' types are static; text is parsed by
// speeder_rt::parse_item_ids. The results' checks mirror check_finite_scores / check_finite_topk (ModelOutputError).
#pragma once

#include "speeder_rt/runtime.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

namespace speeder_rt::validation {

inline std::string out_of_range(const std::string& value, int64_t num_items) {
  return "item ids must be in 0.." + std::to_string(num_items - 1) + ", got " + value;
}

// Every id in 0..num_items-1; the first one that is not is named.
inline void check_ids(const std::vector<int64_t>& ids, const std::string& field, int64_t num_items) {
  for (const int64_t id : ids) {
    if (id < 0 || id >= num_items) throw RequestError(field, out_of_range(std::to_string(id), num_items));
  }
}

inline void check_history(const std::vector<int64_t>& row, const std::string& field, const ExportInfo& info) {
  if (row.empty()) throw RequestError(field, "empty history (at least one item is needed)");
  if (static_cast<int64_t>(row.size()) > info.max_history) {
    throw RequestError(field, std::to_string(row.size()) + " items, more than max_history=" +
                                  std::to_string(info.max_history));
  }
  check_ids(row, field, info.num_items);
}

inline void check_histories(const IdRows& histories, const ExportInfo& info) {
  if (histories.empty()) throw RequestError("history_ids", "empty batch (at least one history is needed)");
  for (size_t i = 0; i < histories.size(); ++i) {
    check_history(histories[i], "history_ids[" + std::to_string(i) + "]", info);
  }
}

inline void check_count(size_t count, const std::string& field, const ExportInfo& info) {
  if (count < 1 || static_cast<int64_t>(count) > info.max_candidates) {
    throw RequestError(field, std::to_string(count) + " candidates per user, outside 1..max_candidates=" +
                                  std::to_string(info.max_candidates));
  }
}

// Equal row lengths, one row per history, the count, the ids.
inline void check_candidates(const IdRows& candidates, size_t batch, const ExportInfo& info) {
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (candidates[i].size() != candidates.front().size()) {
      throw RequestError("candidate_ids[" + std::to_string(i) + "]",
                         std::to_string(candidates[i].size()) + " candidates where candidate_ids[0] has " +
                             std::to_string(candidates.front().size()) + " (every row needs the same count)");
    }
  }
  if (candidates.size() != batch) {
    throw RequestError("candidate_ids",
                       std::to_string(candidates.size()) + " rows for " + std::to_string(batch) + " histories");
  }
  check_count(candidates.front().size(), "candidate_ids", info);
  for (size_t i = 0; i < candidates.size(); ++i) {
    check_ids(candidates[i], "candidate_ids[" + std::to_string(i) + "]", info.num_items);
  }
}

inline void check_k(int64_t k, const ExportInfo& info) {
  if (info.topk == 0) throw RequestError("k", "no top-k graph (exported with --topk 0)");
  if (k < 1 || k > info.topk) {
    throw RequestError("k", std::to_string(k) + " is outside 1..max_topk=" + std::to_string(info.topk));
  }
}

inline void check_requests(const std::vector<Request>& requests, const ExportInfo& info) {
  if (requests.empty()) throw RequestError("requests", "empty batch (at least one request is needed)");
  for (size_t i = 0; i < requests.size(); ++i) {
    const std::string field = "requests[" + std::to_string(i) + "]";
    check_history(requests[i].history, field + ".history", info);
    check_count(requests[i].candidates.size(), field + ".candidates", info);
    check_ids(requests[i].candidates, field + ".candidates", info.num_items);
  }
}

// The first non-finite score (row order, then position) as validation._non_finite_answer words it; the value as
// Python's repr(float) shows it.
inline ModelOutputError non_finite_answer(const std::string& row, const std::string& position, float value) {
  const char* shown = std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf";
  return ModelOutputError(row + ": the model scored " + position + " " + shown +
                          "; its weights or item features are not finite (a diverged training or a corrupt export), "
                          "so no scores are returned");
}

// Every score finite; row i is named field[i].
inline void check_finite_scores(const ScoreRows& scores, const std::string& field) {
  for (size_t i = 0; i < scores.size(); ++i) {
    for (size_t j = 0; j < scores[i].size(); ++j) {
      if (!std::isfinite(scores[i][j])) {
        throw non_finite_answer(field + "[" + std::to_string(i) + "]", "candidate " + std::to_string(j), scores[i][j]);
      }
    }
  }
}

// Every top-k score finite, or -inf for an item of the row's own history (the excluded items that a k beyond the
// items left reaches): a NaN would otherwise rank first.
inline void check_finite_topk(const IdRows& histories, const TopK& top) {
  for (size_t i = 0; i < top.scores.size(); ++i) {
    for (size_t rank = 0; rank < top.scores[i].size(); ++rank) {
      const float score = top.scores[i][rank];
      const int64_t item = top.ids[i][rank];
      const bool excluded = std::find(histories[i].begin(), histories[i].end(), item) != histories[i].end();
      if (!std::isfinite(score) && !(score == -INFINITY && excluded)) {
        throw non_finite_answer("history_ids[" + std::to_string(i) + "]",
                                "item " + std::to_string(item) + " (rank " + std::to_string(rank) + ")", score);
      }
    }
  }
}

// A string as validation.describe shows it: JSON-quoted (json.dumps(..., ensure_ascii=False)), its first 40 bytes
// (40 characters in Python: the same for ASCII), "..." after a longer one.
inline std::string quoted(std::string_view text) {
  constexpr size_t kShown = 40;  // validation.STRING_SHOWN
  std::string out = "\"";
  for (const char c : text.substr(0, kShown)) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escape[8];
          std::snprintf(escape, sizeof escape, "\\u%04x", static_cast<unsigned>(c));
          out += escape;
        } else {
          out += c;
        }
    }
  }
  return out + "\"" + (text.size() > kShown ? "..." : "");
}

}  // namespace speeder_rt::validation
