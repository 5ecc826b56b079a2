// speeder_rt C++ runtime: serve a Speeder export directory written by
//   python -m speeder_rt.export --engine aoti --checkpoint best.pt --out DIR
// (export.json + scores.pt2 [+ topk.pt2], AOTInductor packages) with the semantics of the Python
// speeder_rt.runtime.Recommender: same validation rules and messages, same results.
//
//   speeder_rt::Recommender rec("exports/aoti");
//   auto scores = rec.recommend({{3, 17, 5}, {8}}, {{1, 2, 3}, {4, 5, 6}});   // [B][K] float
//   auto top = rec.topk({{3, 17, 5}}, 5);                                      // ids / scores [B][k]
//
// Histories are item ids, oldest first; every id must be in 0..num_items-1. Bad requests throw RequestError
// (nothing is run): the request contract of speeder_rt/runtime/validation.py, the same checks in the same order
// with the same messages as every Python runtime. A NaN or infinite score of a valid request throws
// ModelOutputError instead of being returned (top-k never ranks one). A directory that is not an AOTInductor
// export throws std::invalid_argument; an unreadable export.json or package std::runtime_error / c10::Error.
//
// The catalog is the export's item-token table (items/current.json and the .npy file it names, docs/export.md):
// read on load, and again by reload_items(), which switches to a newer version (e.g. after
// `python -m speeder_rt.catalog add --export DIR`) without reloading the graphs. The table is checked first (shape
// and dtype against current.json and the graphs, every value finite: std::invalid_argument naming the file, row
// and column); the sha256 in current.json is not checked here (the Python runtimes check it).
//
// Thread safety: all methods may be called concurrently (reload_items calls run one at a time); a call serves the
// item table that was current when it started (a mutex guards only the swap of that pointer). Each
// call runs on one of Options::num_runners model instances that AOTInductor's container keeps (weights
// shared) and waits while all of them are busy. On a CPU one run already uses every core (intra-op
// threads): on the 2-core test machine 1, 2 or 4 runners under 8 threads all served ~1200 single-user
// requests/s, so the default is 1; more runners can overlap small requests on a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace speeder_rt {

// The parts of export.json the runtime uses.
struct ExportInfo {
  std::string directory;
  std::string engine;          // "aoti"
  std::string device;          // the packages' device: "cpu", "cuda", "cuda:1"
  std::string dtype;           // "fp32", "fp16", "bf16"
  int64_t num_items = 0;       // valid item ids: 0 .. num_items - 1 (the served item table's rows)
  int64_t items_version = 0;   // the served item table's version (items/current.json)
  int64_t max_batch = 0;       // rows per model call (larger batches are split)
  int64_t max_history = 0;     // items per history: 1 .. max_history
  int64_t max_candidates = 0;  // candidates per request: 1 .. max_candidates
  int64_t topk = 0;            // the exported k; topk() answers 1 <= k <= topk (0: no top-k graph)
};

struct Options {
  std::size_t num_runners = 1;  // model instances per graph = calls that can run at the same time
};

// One user's request for recommend_batch.
struct Request {
  std::vector<int64_t> history;     // oldest first
  std::vector<int64_t> candidates;  // item ids to score
};

using IdRows = std::vector<std::vector<int64_t>>;
using ScoreRows = std::vector<std::vector<float>>;

struct TopK {
  IdRows ids;        // [B][k], best first
  ScoreRows scores;  // [B][k]
};

// A request the contract refuses. what() is "field: reason"; field() names the part of the request
// ("history_ids[2]", "candidate_ids", "k", "requests[1].candidates"). The Python binding raises it as
// speeder_rt.runtime.validation.RequestError (a ValueError) with the same field and reason.
class RequestError : public std::invalid_argument {
 public:
  RequestError(const std::string& field, const std::string& reason)
      : std::invalid_argument(field + ": " + reason), field_(field), reason_(reason) {}
  const std::string& field() const noexcept { return field_; }
  const std::string& reason() const noexcept { return reason_; }

 private:
  std::string field_;
  std::string reason_;
};

// The model scored a valid request with a NaN or an infinity: its weights or item features are not finite (a
// diverged training, a corrupt export); not the request's fault, and no scores are returned. what() names the
// request row, the candidate position or top-k rank and the value, as speeder_rt/runtime/validation.py's
// check_finite_scores / check_finite_topk do ("history_ids[2]: the model scored candidate 0 nan; ..."). The Python
// binding raises it as speeder_rt.runtime.validation.ModelOutputError (a RuntimeError).
class ModelOutputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Item ids from text, separated by whitespace: each a plain decimal integer that fits int64 ("17", "-1"; not "+3",
// "3.0", "0x3", "1e3"). A token that is not one throws RequestError(field, 'item ids must be integers, got "+3"'),
// a decimal integer beyond int64 the contract's out-of-range message (its ids are 0..num_items-1). Ranges of ids
// that fit int64 are left to the calls above.
std::vector<int64_t> parse_item_ids(std::string_view text, const std::string& field, int64_t num_items);

class Recommender {
 public:
  explicit Recommender(const std::string& export_dir, const Options& options = {});
  ~Recommender();
  Recommender(Recommender&&) noexcept;
  Recommender& operator=(Recommender&&) noexcept;

  ExportInfo info() const;  // as of the served item table

  // Serve the export's current item table if its version differs from the one served; true when it switched.
  // A table that fails its checks, or has fewer rows than the one served (versions only append), throws
  // std::invalid_argument and the served table stays.
  bool reload_items();

  // Scores [B][K] of each user's K candidates (every row has the same K), higher = more likely next.
  ScoreRows recommend(const IdRows& histories, const IdRows& candidates) const;

  // Scores per request; requests may have different candidate counts. Requests with the same count are
  // batched together (padded histories, split at max_batch); the answer keeps the requests' order.
  ScoreRows recommend_batch(const std::vector<Request>& requests) const;

  // The k best items of the whole catalog per user, history items excluded.
  TopK topk(const IdRows& histories, int64_t k) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace speeder_rt
