// CUDA dispatch of the speeder ops: argument checks, allocation and streams around the plain-CUDA kernels of
// kernels.cu. Index ranges are checked on the device with one synchronisation per call.
#include "common.h"
#include "kernels.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace speeder::ops {
namespace {

cuda::DType kernel_dtype(const at::Tensor& table, const char* op) {
  switch (table.scalar_type()) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default: TORCH_CHECK_VALUE(false, op, ": CUDA tables must be float32, float16 or bfloat16, got ", table.scalar_type());
  }
}

at::Tensor out_of_range(const at::Tensor& ids, int64_t limit) {
  return ((ids < 0) | (ids >= limit)).any();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_inputs_embeds_cuda(
    const at::Tensor& item_table, const at::Tensor& history, const at::Tensor& history_len, const at::Tensor& candidates,
    const at::Tensor& recency, const at::Tensor& candidate_embedding, const at::Tensor& template_ids,
    const at::Tensor& embed_weight, int64_t prefix, int64_t middle, int64_t suffix) {
  const PromptShape s = check_assemble_args(item_table, history, history_len, candidates, recency, candidate_embedding,
                                            template_ids, embed_weight, prefix, middle, suffix);
  const cuda::DType dtype = kernel_dtype(item_table, "assemble_inputs_embeds");
  const c10::cuda::CUDAGuard guard(item_table.device());
  const at::Tensor lens = history_len.to(at::kLong).contiguous();
  const at::Tensor hist = history.contiguous(), cands = candidates.contiguous();
  const at::Tensor tmpl = template_ids.to(at::kLong).contiguous();
  const int64_t num_items = item_table.size(0);
  const at::Tensor read = at::arange(s.width, hist.options()).unsqueeze(0) < lens.unsqueeze(1);  // slots read
  const at::Tensor bad = at::stack({((lens < 0) | (lens > s.width)).any(),
                                    (read & ((hist < 0) | (hist >= num_items))).any(),
                                    out_of_range(cands, num_items),
                                    out_of_range(tmpl, embed_weight.size(0))}).cpu();
  const bool* flag = bad.const_data_ptr<bool>();
  TORCH_CHECK_VALUE(!flag[0], "assemble_inputs_embeds: history_len must be in 0..W=", s.width);
  TORCH_CHECK_VALUE(!flag[1], "assemble_inputs_embeds: history ids must be in 0..", num_items - 1,
              " (the first history_len ids of a row are read)");
  TORCH_CHECK_VALUE(!flag[2], "assemble_inputs_embeds: candidate ids must be in 0..", num_items - 1);
  TORCH_CHECK_VALUE(!flag[3], "assemble_inputs_embeds: template ids must be in 0..", embed_weight.size(0) - 1);

  at::Tensor out = at::empty({s.batch, s.length, s.dim}, item_table.options());
  at::Tensor item_idx = at::empty({s.batch, s.length}, item_table.options().dtype(at::kInt));
  at::Tensor token_mask = at::empty({s.batch, s.length}, item_table.options().dtype(at::kBool));
  const at::Tensor items = item_table.contiguous(), rec = recency.contiguous();
  const at::Tensor cemb = candidate_embedding.contiguous(), embed = embed_weight.contiguous();
  const cuda::AssembleArgs args{dtype, items.const_data_ptr(), rec.const_data_ptr(), cemb.const_data_ptr(),
                                embed.const_data_ptr(), hist.const_data_ptr<int64_t>(), lens.const_data_ptr<int64_t>(),
                                cands.const_data_ptr<int64_t>(), tmpl.const_data_ptr<int64_t>(), s.batch, s.width,
                                s.num_candidates, s.length, s.dim, prefix, middle, suffix, out.mutable_data_ptr(),
                                item_idx.mutable_data_ptr<int32_t>(), token_mask.mutable_data_ptr<bool>()};
  C10_CUDA_CHECK(cuda::assemble_inputs_embeds(args, c10::cuda::getCurrentCUDAStream()));
  return {out, item_idx, token_mask};
}

std::tuple<at::Tensor, at::Tensor> score_topk_cuda(const at::Tensor& query, const at::Tensor& item_table, int64_t k,
                                                   const std::optional<at::Tensor>& exclude_ids) {
  check_score_topk_args(query, item_table, k, exclude_ids);
  TORCH_CHECK_VALUE(k <= cuda::kTopkTile, "score_topk: k=", k, "; the CUDA kernel returns at most k=", cuda::kTopkTile);
  const cuda::DType dtype = kernel_dtype(item_table, "score_topk");
  const c10::cuda::CUDAGuard guard(item_table.device());
  const int64_t batch = query.size(0), num_items = item_table.size(0);
  at::Tensor exclude;
  if (exclude_ids.has_value() && exclude_ids->size(1) > 0 && batch > 0) {
    exclude = exclude_ids->contiguous();
    // Distinct ids >= 0 per row: sort, then count the entries that differ from their left neighbour.
    const at::Tensor sorted = std::get<0>(exclude.sort(1));
    const at::Tensor fresh = at::cat({at::ones({batch, 1}, sorted.options().dtype(at::kBool)),
                                      sorted.narrow(1, 1, sorted.size(1) - 1) != sorted.narrow(1, 0, sorted.size(1) - 1)},
                                     1);
    const at::Tensor left = num_items - ((sorted >= 0) & fresh).sum(1);
    const at::Tensor facts = at::stack({(exclude >= num_items).any().to(at::kLong), left.min(), left.argmin()}).cpu();
    const int64_t* f = facts.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(f[0] == 0, "score_topk: exclude_ids must be < ", num_items, " (negative = none)");
    TORCH_CHECK_VALUE(k <= f[1], "score_topk: k=", k, " but row ", f[2], " has only ", f[1], " items left after excluding ",
                num_items - f[1], " of ", num_items);
  }
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor table = item_table.contiguous();
  const int64_t entries = cuda::topk_workspace_entries(batch, num_items, k);
  at::Tensor partial_scores = at::empty({entries}, q.options());
  at::Tensor partial_ids = at::empty({entries}, q.options().dtype(at::kLong));
  at::Tensor ids = at::empty({batch, k}, q.options().dtype(at::kLong));
  at::Tensor scores = at::empty({batch, k}, q.options());
  const cuda::TopkArgs args{dtype, q.const_data_ptr<float>(), table.const_data_ptr(),
                            exclude.defined() ? exclude.const_data_ptr<int64_t>() : nullptr, batch, num_items,
                            q.size(1), exclude.defined() ? exclude.size(1) : 0, k, partial_scores.mutable_data_ptr<float>(),
                            partial_ids.mutable_data_ptr<int64_t>(), ids.mutable_data_ptr<int64_t>(),
                            scores.mutable_data_ptr<float>()};
  C10_CUDA_CHECK(cuda::score_topk(args, c10::cuda::getCurrentCUDAStream()));
  return {ids, scores};
}

at::Tensor score_candidates_cuda(const at::Tensor& query, const at::Tensor& item_table, const at::Tensor& candidates) {
  check_score_candidates_args(query, item_table, candidates);
  const cuda::DType dtype = kernel_dtype(item_table, "score_candidates");
  const c10::cuda::CUDAGuard guard(item_table.device());
  const at::Tensor cands = candidates.contiguous();
  TORCH_CHECK_VALUE(!out_of_range(cands, item_table.size(0)).item<bool>(), "score_candidates: candidate ids must be in 0..",
              item_table.size(0) - 1);
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor table = item_table.contiguous();
  at::Tensor out = at::empty(cands.sizes(), q.options());
  C10_CUDA_CHECK(cuda::score_candidates(dtype, q.const_data_ptr<float>(), table.const_data_ptr(),
                                        cands.const_data_ptr<int64_t>(), cands.size(0), cands.size(1), q.size(1),
                                        out.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(speeder, CUDA, m) {
  m.impl("assemble_inputs_embeds", &assemble_inputs_embeds_cuda);
  m.impl("score_topk", &score_topk_cuda);
  m.impl("score_candidates", &score_candidates_cuda);
}

}  // namespace speeder::ops
