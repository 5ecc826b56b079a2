// Meta kernels of the speeder ops: output shapes and dtypes only, in symbolic sizes, so FakeTensor tracing
// (torch.export, torch.compile, AOTInductor) works in any process that loaded the ops, dynamic shapes included.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace speeder::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_inputs_embeds_meta(
    const at::Tensor& item_table, const at::Tensor& history, const at::Tensor& /*history_len*/,
    const at::Tensor& candidates, const at::Tensor& /*recency*/, const at::Tensor& /*candidate_embedding*/,
    const at::Tensor& /*template_ids*/, const at::Tensor& /*embed_weight*/, int64_t prefix, int64_t middle,
    int64_t suffix) {
  const c10::SymInt batch = history.sym_size(0);
  const c10::SymInt length = history.sym_size(1) + candidates.sym_size(1) + (prefix + middle + suffix + 1);
  return {at::empty_symint({batch, length, item_table.sym_size(1)}, item_table.options()),
          at::empty_symint({batch, length}, item_table.options().dtype(at::kInt)),
          at::empty_symint({batch, length}, item_table.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor> score_topk_meta(const at::Tensor& query, const at::Tensor& /*item_table*/,
                                                   int64_t k, const std::optional<at::Tensor>& /*exclude_ids*/) {
  return {at::empty_symint({query.sym_size(0), k}, query.options().dtype(at::kLong)),
          at::empty_symint({query.sym_size(0), k}, query.options().dtype(at::kFloat))};
}

at::Tensor score_candidates_meta(const at::Tensor& query, const at::Tensor& /*item_table*/,
                                 const at::Tensor& candidates) {
  return at::empty_symint(candidates.sym_sizes(), query.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(speeder, Meta, m) {
  m.impl("assemble_inputs_embeds", &assemble_inputs_embeds_meta);
  m.impl("score_topk", &score_topk_meta);
  m.impl("score_candidates", &score_candidates_meta);
}

}  // namespace speeder::ops
