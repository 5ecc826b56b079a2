// Argument checks shared by the CPU and CUDA implementations of the speeder ops (shapes, dtypes, devices;
// index ranges are checked by each backend, the CPU one while it reads the ids).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace speeder::ops {

struct PromptShape {
  int64_t batch, width, num_candidates, length, dim;
};

using NamedTensors = std::initializer_list<std::pair<const char*, const at::Tensor*>>;

inline void check_same_device(const at::Tensor& reference, NamedTensors tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_VALUE(t->device() == reference.device(), "speeder: ", name, " is on ", t->device(), " but item_table is on ",
                reference.device());
  }
}

inline bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kLong || t.scalar_type() == at::kInt;
}

inline PromptShape check_assemble_args(const at::Tensor& item_table, const at::Tensor& history,
                                       const at::Tensor& history_len, const at::Tensor& candidates,
                                       const at::Tensor& recency, const at::Tensor& candidate_embedding,
                                       const at::Tensor& template_ids, const at::Tensor& embed_weight, int64_t prefix,
                                       int64_t middle, int64_t suffix) {
  check_same_device(item_table, {{"history", &history}, {"history_len", &history_len}, {"candidates", &candidates},
                                 {"recency", &recency}, {"candidate_embedding", &candidate_embedding},
                                 {"template_ids", &template_ids}, {"embed_weight", &embed_weight}});
  TORCH_CHECK_VALUE(item_table.dim() == 2 && at::isFloatingType(item_table.scalar_type()),
              "assemble_inputs_embeds: item_table must be a floating tensor [N, d], got ", item_table.scalar_type(),
              " of shape ", item_table.sizes());
  const int64_t dim = item_table.size(1);
  for (const auto& [name, t] : {std::pair{"recency", &recency}, {"candidate_embedding", &candidate_embedding},
                                {"embed_weight", &embed_weight}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == item_table.scalar_type(), "assemble_inputs_embeds: ", name, " has dtype ",
                t->scalar_type(), ", item_table has ", item_table.scalar_type());
  }
  TORCH_CHECK_VALUE(history.dim() == 2 && history.scalar_type() == at::kLong,
              "assemble_inputs_embeds: history must be an int64 tensor [B, W], got ", history.scalar_type(), " of shape ",
              history.sizes());
  const int64_t batch = history.size(0), width = history.size(1);
  TORCH_CHECK_VALUE(is_index_dtype(history_len) && history_len.dim() == 1 && history_len.size(0) == batch,
              "assemble_inputs_embeds: history_len must be an int32 / int64 tensor [B=", batch, "], got ",
              history_len.scalar_type(), " of shape ", history_len.sizes());
  TORCH_CHECK_VALUE(candidates.dim() == 2 && candidates.scalar_type() == at::kLong && candidates.size(0) == batch,
              "assemble_inputs_embeds: candidates must be an int64 tensor [B=", batch, ", K], got ",
              candidates.scalar_type(), " of shape ", candidates.sizes());
  TORCH_CHECK_VALUE(recency.dim() == 2 && recency.size(1) == dim && recency.size(0) >= width,
              "assemble_inputs_embeds: recency must have shape [R, d=", dim, "] with R >= W=", width, ", got ",
              recency.sizes());
  TORCH_CHECK_VALUE(candidate_embedding.dim() == 1 && candidate_embedding.size(0) == dim,
              "assemble_inputs_embeds: candidate_embedding must have shape [d=", dim, "], got ",
              candidate_embedding.sizes());
  TORCH_CHECK_VALUE(embed_weight.dim() == 2 && embed_weight.size(1) == dim,
              "assemble_inputs_embeds: embed_weight must have shape [V, d=", dim, "], got ", embed_weight.sizes());
  TORCH_CHECK_VALUE(prefix >= 0 && middle >= 0 && suffix >= 0,
              "assemble_inputs_embeds: template sizes must be >= 0, got (", prefix, ", ", middle, ", ", suffix, ")");
  const int64_t num_template = prefix + middle + suffix + 1;
  TORCH_CHECK_VALUE(is_index_dtype(template_ids) && template_ids.dim() == 1 && template_ids.size(0) == num_template,
              "assemble_inputs_embeds: template_ids must be an int32 / int64 tensor [P + Mi + S + 1 = ", num_template,
              "], got ", template_ids.scalar_type(), " of shape ", template_ids.sizes());
  const int64_t num_candidates = candidates.size(1);
  return {batch, width, num_candidates, prefix + width + middle + num_candidates + suffix + 1, dim};
}

// query [B, d] and item_table [N, d], floating, same device.
inline void check_query_table(const char* op, const at::Tensor& query, const at::Tensor& item_table) {
  TORCH_CHECK_VALUE(item_table.dim() == 2 && at::isFloatingType(item_table.scalar_type()), op,
              ": item_table must be a floating tensor [N, d], got ", item_table.scalar_type(), " of shape ",
              item_table.sizes());
  TORCH_CHECK_VALUE(query.dim() == 2 && at::isFloatingType(query.scalar_type()) && query.size(1) == item_table.size(1), op,
              ": query must be a floating tensor [B, d=", item_table.size(1), "], got ", query.scalar_type(), " of shape ",
              query.sizes());
  TORCH_CHECK_VALUE(query.device() == item_table.device(), op, ": query is on ", query.device(), " but item_table is on ",
              item_table.device());
}

inline void check_score_topk_args(const at::Tensor& query, const at::Tensor& item_table, int64_t k,
                                  const std::optional<at::Tensor>& exclude_ids) {
  check_query_table("score_topk", query, item_table);
  const int64_t num_items = item_table.size(0);
  TORCH_CHECK_VALUE(k >= 1, "score_topk: k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= num_items, "score_topk: k=", k, " exceeds the catalog size ", num_items);
  if (exclude_ids.has_value()) {
    const at::Tensor& ex = *exclude_ids;
    TORCH_CHECK_VALUE(ex.dim() == 2 && ex.scalar_type() == at::kLong && ex.size(0) == query.size(0),
                "score_topk: exclude_ids must be an int64 tensor [B=", query.size(0), ", E], got ", ex.scalar_type(),
                " of shape ", ex.sizes());
    TORCH_CHECK_VALUE(ex.device() == item_table.device(), "score_topk: exclude_ids is on ", ex.device(),
                " but item_table is on ", item_table.device());
  }
}

inline void check_score_candidates_args(const at::Tensor& query, const at::Tensor& item_table,
                                        const at::Tensor& candidates) {
  check_query_table("score_candidates", query, item_table);
  TORCH_CHECK_VALUE(candidates.dim() == 2 && candidates.scalar_type() == at::kLong && candidates.size(0) == query.size(0),
              "score_candidates: candidates must be an int64 tensor [B=", query.size(0), ", K], got ",
              candidates.scalar_type(), " of shape ", candidates.sizes());
  TORCH_CHECK_VALUE(candidates.device() == item_table.device(), "score_candidates: candidates is on ", candidates.device(),
              " but item_table is on ", item_table.device());
}

}  // namespace speeder::ops
