#include "speeder_rt/runtime.h"

#include "items.h"
#include "json.h"
#include "validation.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace speeder_rt {
namespace {

namespace fs = std::filesystem;
using Loader = torch::inductor::AOTIModelPackageLoader;
using Rows = std::vector<const std::vector<int64_t>*>;

// speeder_rt.export.format: FORMAT_VERSION under VERSION_KEY, or LEGACY_VERSION_KEY in exports written before it
constexpr int64_t kFormatVersion = 1;
constexpr const char* kVersionKey = "format_version";
constexpr const char* kLegacyVersionKey = "format";

std::string read_text(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(path.string() + ": cannot be read");
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

// (history_ids padded with -1 to the longest row, history_mask): the graphs' first two inputs.
std::vector<at::Tensor> history_inputs(const Rows& rows) {
  size_t width = 0;
  for (const auto* row : rows) width = std::max(width, row->size());
  const auto batch = static_cast<int64_t>(rows.size());
  at::Tensor ids = at::empty({batch, static_cast<int64_t>(width)}, at::kLong);
  at::Tensor mask = at::empty({batch, static_cast<int64_t>(width)}, at::kBool);
  int64_t* ids_p = ids.mutable_data_ptr<int64_t>();
  bool* mask_p = mask.mutable_data_ptr<bool>();
  for (size_t b = 0; b < rows.size(); ++b) {
    const auto& row = *rows[b];
    std::copy(row.begin(), row.end(), ids_p + b * width);
    std::fill(ids_p + b * width + row.size(), ids_p + (b + 1) * width, -1);
    std::fill(mask_p + b * width, mask_p + b * width + row.size(), true);
    std::fill(mask_p + b * width + row.size(), mask_p + (b + 1) * width, false);
  }
  return {ids, mask};
}

at::Tensor candidate_input(const Rows& rows) {
  const size_t count = rows.front()->size();
  at::Tensor ids = at::empty({static_cast<int64_t>(rows.size()), static_cast<int64_t>(count)}, at::kLong);
  int64_t* p = ids.mutable_data_ptr<int64_t>();
  for (size_t b = 0; b < rows.size(); ++b) std::copy(rows[b]->begin(), rows[b]->end(), p + b * count);
  return ids;
}

template <typename T>
std::vector<T> row_of(const at::Tensor& matrix, int64_t row, int64_t width) {
  const T* p = matrix.const_data_ptr<T>() + row * matrix.size(1);
  return std::vector<T>(p, p + width);
}

}  // namespace

// What one call reads: the export's facts with the served item table's size and version, and that table.
struct Served {
  ExportInfo info;
  at::Tensor item_tokens;  // [num_items, dim] on the packages' device: the graphs' last input
};

struct Recommender::Impl {
  ExportInfo info;  // export.json's (num_items: the catalog at export time)
  c10::Device device{c10::kCPU};
  std::string table_dtype;  // the graphs' item_tokens input: "float32" or "float16", [num_items, table_dim]
  int64_t table_dim = 0;
  std::unique_ptr<Loader> scores;
  std::unique_ptr<Loader> topk;  // null without a top-k graph
  mutable std::mutex served_mutex;  // guards only the pointer swap
  std::shared_ptr<const Served> served;
  std::mutex reload_mutex;  // one reload_items at a time

  std::shared_ptr<const Served> current() const {
    const std::lock_guard<std::mutex> lock(served_mutex);
    return served;
  }

  // Runs a package on the request's inputs (CPU tensors) and the item table; outputs come back as contiguous CPU
  // tensors.
  std::vector<at::Tensor> run(Loader& loader, std::vector<at::Tensor> inputs, const at::Tensor& item_tokens) const {
    c10::InferenceMode guard;
    for (auto& t : inputs) t = t.to(device);
    inputs.push_back(item_tokens);
    std::vector<at::Tensor> outputs = loader.run(inputs);
    for (auto& t : outputs) t = t.to(c10::kCPU).contiguous();
    return outputs;
  }

  // Scores of validated rows sharing one candidate count, in chunks of max_batch, into *out[i].
  void score(const Served& served, const Rows& histories, const Rows& candidates,
             const std::vector<std::vector<float>*>& out) const {
    for (size_t start = 0; start < histories.size(); start += info.max_batch) {
      const size_t stop = std::min(histories.size(), start + static_cast<size_t>(info.max_batch));
      const Rows hist(histories.begin() + start, histories.begin() + stop);
      const Rows cands(candidates.begin() + start, candidates.begin() + stop);
      std::vector<at::Tensor> inputs = history_inputs(hist);
      inputs.push_back(candidate_input(cands));
      const at::Tensor result = run(*scores, std::move(inputs), served.item_tokens).at(0);
      for (size_t i = start; i < stop; ++i) {
        *out[i] = row_of<float>(result, static_cast<int64_t>(i - start), result.size(1));
      }
    }
  }
};

Recommender::Recommender(const std::string& export_dir, const Options& options) : impl_(std::make_unique<Impl>()) {
  const fs::path dir(export_dir);
  const fs::path meta_path = dir / "export.json";
  if (!fs::is_regular_file(meta_path)) {
    throw std::invalid_argument(export_dir + ": not an export directory (no export.json)");
  }
  if (options.num_runners < 1) throw std::invalid_argument("Options::num_runners must be >= 1");
  const json::Value meta = json::parse(read_text(meta_path));
  ExportInfo& info = impl_->info;
  info.directory = export_dir;
  info.engine = meta.at("engine").as_string();
  const int64_t version = meta.at(meta.contains(kVersionKey) ? kVersionKey : kLegacyVersionKey).as_int();
  if (version != kFormatVersion) {
    throw std::invalid_argument(meta_path.string() + ": unknown export format " + std::to_string(version));
  }
  if (info.engine != "aoti") {
    throw std::invalid_argument(meta_path.string() + ": engine '" + info.engine +
                                "'; the C++ runtime serves AOTInductor exports (--engine aoti)");
  }
  info.device = meta.at("device").as_string();
  info.dtype = meta.at("dtype").as_string();
  info.num_items = meta.at("num_items").as_int();
  const json::Value& ranges = meta.at("ranges");
  info.max_batch = ranges.at("max_batch").as_int();
  info.max_history = ranges.at("max_history").as_int();
  info.max_candidates = ranges.at("max_candidates").as_int();
  info.topk = meta.at("topk").as_int();

  impl_->device = c10::Device(info.device);
  if (impl_->device.is_cuda() && !at::hasCUDA()) {
    throw std::runtime_error(export_dir + ": the packages were compiled for " + info.device +
                             "; this libtorch has no CUDA support or no CUDA device is available");
  }
  const c10::DeviceIndex index = impl_->device.has_index() ? impl_->device.index() : -1;
  const auto load = [&](const std::string& graph) {
    const fs::path file = dir / meta.at("graphs").at(graph).at("file").as_string();
    return std::make_unique<Loader>(file.string(), "model", false, options.num_runners, index);
  };
  const json::Value* table = nullptr;  // the item_tokens input spec
  for (const json::Value& input : meta.at("graphs").at("scores").at("inputs").as_array()) {
    if (input.at("name").as_string() == "item_tokens") table = &input;
  }
  if (table == nullptr) {
    throw std::invalid_argument(meta_path.string() + ": the graphs take no item_tokens input (an export written "
                                "before item tables were versioned: re-export it)");
  }
  impl_->table_dtype = table->at("dtype").as_string();
  impl_->table_dim = table->at("shape").as_array().at(1).as_int();
  impl_->scores = load("scores");
  if (meta.at("graphs").contains("topk")) {
    impl_->topk = load("topk");
  } else {
    info.topk = 0;
  }
  reload_items();
}

Recommender::~Recommender() = default;
Recommender::Recommender(Recommender&&) noexcept = default;
Recommender& Recommender::operator=(Recommender&&) noexcept = default;

ExportInfo Recommender::info() const {
  return impl_->current()->info;
}

bool Recommender::reload_items() {
  const std::lock_guard<std::mutex> reload(impl_->reload_mutex);
  const std::shared_ptr<const Served> old = impl_->current();
  const fs::path dir(impl_->info.directory);
  if (old != nullptr && items::current_version(dir) == old->info.items_version) return false;
  items::Table table = items::read_current(dir);
  const int64_t rows = table.tokens.size(0);
  const std::string dtype = table.tokens.scalar_type() == at::kFloat ? "float32" : "float16";
  if (dtype != impl_->table_dtype || table.tokens.size(1) != impl_->table_dim) {
    throw std::invalid_argument(table.file + ": " + dtype + " rows of width " + std::to_string(table.tokens.size(1)) +
                                "; the graphs' item_tokens input takes " + impl_->table_dtype + " rows of width " +
                                std::to_string(impl_->table_dim));
  }
  if (old != nullptr && rows < old->info.num_items) {
    throw std::invalid_argument(impl_->info.directory + ": item table version " + std::to_string(table.version) +
                                " has " + std::to_string(rows) + " items, fewer than the " +
                                std::to_string(old->info.num_items) + " served (versions only append)");
  }
  auto next = std::make_shared<Served>(Served{impl_->info, table.tokens.to(impl_->device)});
  next->info.num_items = rows;
  next->info.items_version = table.version;
  const std::lock_guard<std::mutex> lock(impl_->served_mutex);
  impl_->served = std::move(next);
  return true;
}

ScoreRows Recommender::recommend(const IdRows& histories, const IdRows& candidates) const {
  const std::shared_ptr<const Served> served = impl_->current();
  validation::check_histories(histories, served->info);
  validation::check_candidates(candidates, histories.size(), served->info);

  ScoreRows out(histories.size());
  Rows hist, cands;
  std::vector<std::vector<float>*> targets;
  for (size_t i = 0; i < histories.size(); ++i) {
    hist.push_back(&histories[i]);
    cands.push_back(&candidates[i]);
    targets.push_back(&out[i]);
  }
  impl_->score(*served, hist, cands, targets);
  validation::check_finite_scores(out, "history_ids");
  return out;
}

ScoreRows Recommender::recommend_batch(const std::vector<Request>& requests) const {
  const std::shared_ptr<const Served> served = impl_->current();
  validation::check_requests(requests, served->info);
  std::map<size_t, std::vector<size_t>> by_count;  // candidate count -> request indices, in order
  for (size_t i = 0; i < requests.size(); ++i) by_count[requests[i].candidates.size()].push_back(i);
  ScoreRows out(requests.size());
  for (const auto& [count, members] : by_count) {
    Rows hist, cands;
    std::vector<std::vector<float>*> targets;
    for (const size_t i : members) {
      hist.push_back(&requests[i].history);
      cands.push_back(&requests[i].candidates);
      targets.push_back(&out[i]);
    }
    impl_->score(*served, hist, cands, targets);
  }
  validation::check_finite_scores(out, "requests");
  return out;
}

TopK Recommender::topk(const IdRows& histories, int64_t k) const {
  const std::shared_ptr<const Served> served = impl_->current();
  const ExportInfo& info = served->info;
  validation::check_k(k, info);
  validation::check_histories(histories, info);
  TopK out;
  for (size_t start = 0; start < histories.size(); start += info.max_batch) {
    const size_t stop = std::min(histories.size(), start + static_cast<size_t>(info.max_batch));
    Rows hist;
    for (size_t i = start; i < stop; ++i) hist.push_back(&histories[i]);
    const std::vector<at::Tensor> result = impl_->run(*impl_->topk, history_inputs(hist), served->item_tokens);
    for (size_t i = start; i < stop; ++i) {
      out.ids.push_back(row_of<int64_t>(result.at(0), static_cast<int64_t>(i - start), k));
      out.scores.push_back(row_of<float>(result.at(1), static_cast<int64_t>(i - start), k));
    }
  }
  validation::check_finite_topk(histories, out);
  return out;
}

std::vector<int64_t> parse_item_ids(std::string_view text, const std::string& field, int64_t num_items) {
  std::vector<int64_t> ids;
  const auto is_space = [](char c) { return c == ' ' || (c >= '\t' && c <= '\r'); };  // std::isspace, "C" locale
  size_t pos = 0;
  while (true) {
    while (pos < text.size() && is_space(text[pos])) ++pos;
    if (pos == text.size()) return ids;
    size_t stop = pos;
    while (stop < text.size() && !is_space(text[stop])) ++stop;
    const std::string_view token = text.substr(pos, stop - pos);
    pos = stop;
    int64_t id = 0;
    const auto [end, error] = std::from_chars(token.data(), token.data() + token.size(), id);  // [-]digits only
    const bool whole = end == token.data() + token.size();
    if (error == std::errc() && whole) {
      ids.push_back(id);
    } else if (error == std::errc::result_out_of_range && whole) {  // shown as Python shows int(token)
      const bool negative = token.front() == '-';
      const std::string_view digits = token.substr(negative);
      const std::string_view significant = digits.substr(std::min(digits.find_first_not_of('0'), digits.size()));
      throw RequestError(field, validation::out_of_range((negative ? "-" : "") + std::string(significant), num_items));
    } else {
      throw RequestError(field, "item ids must be integers, got " + validation::quoted(token));
    }
  }
}

}  // namespace speeder_rt
