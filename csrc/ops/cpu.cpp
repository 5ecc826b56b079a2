// CPU kernels of the speeder ops (see registration.cpp for the schemas).
#include "common.h"
#include "layout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

namespace speeder::ops {
namespace {

constexpr int64_t kGrainElements = 32768;  // at::internal::GRAIN_SIZE: elements of work per parallel task
constexpr int64_t kTopkItemBlock = 2048;   // score_topk: items scored per task (one BLAS call)
constexpr int64_t kTopkRowBlock = 64;      // score_topk: queries per task

int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

void check_ids(const char* op, const char* what, const at::Tensor& ids, int64_t limit) {
  const int64_t* p = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < limit, op, ": ", what, " ids must be in 0..", limit - 1, ", got ", p[i],
                " at flat index ", i);
  }
}

template <typename scalar_t>
void assemble_rows(const PromptShape& s, int64_t prefix, int64_t middle, int64_t suffix, const scalar_t* items,
                   const scalar_t* recency, const scalar_t* candidate_embedding, const scalar_t* embed,
                   const int64_t* history, const int64_t* lens, const int64_t* candidates, const int64_t* template_ids,
                   scalar_t* out, int32_t* item_idx, bool* token_mask) {
  const int64_t d = s.dim;
  // map2 computes reduced-precision types in float and rounds once, like torch's own add.
  const auto add = [](auto a, auto b) { return a + b; };
  at::parallel_for(0, s.batch * s.length, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.length, n = lens[b];
      const Slot slot = locate(row % s.length, n, s.num_candidates, prefix, middle, suffix);
      scalar_t* dst = out + row * d;
      item_idx[row] = slot.item_idx;
      token_mask[row] = slot.source != Source::Padding;
      switch (slot.source) {
        case Source::Template:
          std::memcpy(dst, embed + template_ids[slot.index] * d, d * sizeof(scalar_t));
          break;
        case Source::History:
          at::vec::map2(add, dst, items + history[b * s.width + slot.index] * d, recency + (n - 1 - slot.index) * d, d);
          break;
        case Source::Candidate:
          at::vec::map2(add, dst, items + candidates[b * s.num_candidates + slot.index] * d, candidate_embedding, d);
          break;
        case Source::Padding:
          std::fill_n(dst, d, scalar_t(0));
          break;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_inputs_embeds_cpu(
    const at::Tensor& item_table, const at::Tensor& history, const at::Tensor& history_len, const at::Tensor& candidates,
    const at::Tensor& recency, const at::Tensor& candidate_embedding, const at::Tensor& template_ids,
    const at::Tensor& embed_weight, int64_t prefix, int64_t middle, int64_t suffix) {
  const PromptShape s = check_assemble_args(item_table, history, history_len, candidates, recency, candidate_embedding,
                                            template_ids, embed_weight, prefix, middle, suffix);
  const at::Tensor lens = history_len.to(at::kLong).contiguous();
  const at::Tensor hist = history.contiguous(), cands = candidates.contiguous();
  const at::Tensor tmpl = template_ids.to(at::kLong).contiguous();
  const int64_t num_items = item_table.size(0);
  const int64_t* len_p = lens.const_data_ptr<int64_t>();
  const int64_t* hist_p = hist.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK_VALUE(len_p[b] >= 0 && len_p[b] <= s.width, "assemble_inputs_embeds: history_len[", b, "]=", len_p[b],
                " must be in 0..W=", s.width);
    for (int64_t j = 0; j < len_p[b]; ++j) {
      const int64_t id = hist_p[b * s.width + j];
      TORCH_CHECK_VALUE(id >= 0 && id < num_items, "assemble_inputs_embeds: history[", b, ", ", j, "]=", id,
                  " must be in 0..", num_items - 1, " (the first history_len ids of a row are read)");
    }
  }
  check_ids("assemble_inputs_embeds", "candidate", cands, num_items);
  check_ids("assemble_inputs_embeds", "template", tmpl, embed_weight.size(0));

  at::Tensor out = at::empty({s.batch, s.length, s.dim}, item_table.options());
  at::Tensor item_idx = at::empty({s.batch, s.length}, item_table.options().dtype(at::kInt));
  at::Tensor token_mask = at::empty({s.batch, s.length}, item_table.options().dtype(at::kBool));
  const at::Tensor items = item_table.contiguous(), rec = recency.contiguous();
  const at::Tensor cemb = candidate_embedding.contiguous(), embed = embed_weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, items.scalar_type(), "assemble_inputs_embeds_cpu", [&] {
    assemble_rows<scalar_t>(s, prefix, middle, suffix, items.const_data_ptr<scalar_t>(), rec.const_data_ptr<scalar_t>(),
                            cemb.const_data_ptr<scalar_t>(), embed.const_data_ptr<scalar_t>(), hist_p, len_p,
                            cands.const_data_ptr<int64_t>(), tmpl.const_data_ptr<int64_t>(),
                            out.mutable_data_ptr<scalar_t>(), item_idx.mutable_data_ptr<int32_t>(),
                            token_mask.mutable_data_ptr<bool>());
  });
  return {out, item_idx, token_mask};
}

struct Scored {
  float score;
  int64_t id;
};

// The order of results: higher score first, the lower id first among equal scores.
bool better(const Scored& a, const Scored& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Sorted unique ids >= 0 of each row of exclude_ids [B, E] (negative entries are padding).
std::vector<std::vector<int64_t>> excluded_per_row(const std::optional<at::Tensor>& exclude_ids, int64_t batch,
                                                   int64_t num_items, int64_t k) {
  std::vector<std::vector<int64_t>> rows(batch);
  if (!exclude_ids.has_value()) return rows;
  const at::Tensor ex = exclude_ids->contiguous();
  const int64_t width = ex.size(1);
  const int64_t* p = ex.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    auto& row = rows[b];
    for (int64_t e = 0; e < width; ++e) {
      const int64_t id = p[b * width + e];
      TORCH_CHECK_VALUE(id < num_items, "score_topk: exclude_ids[", b, ", ", e, "]=", id, " must be < ", num_items,
                  " (negative = none)");
      if (id >= 0) row.push_back(id);
    }
    std::sort(row.begin(), row.end());
    row.erase(std::unique(row.begin(), row.end()), row.end());
    const int64_t left = num_items - static_cast<int64_t>(row.size());
    TORCH_CHECK_VALUE(k <= left, "score_topk: k=", k, " but row ", b, " has only ", left, " items left after excluding ",
                row.size(), " of ", num_items);
  }
  return rows;
}

// Block-wise: each task scores kTopkRowBlock queries against kTopkItemBlock items (one BLAS call) and keeps a
// top-k heap per query; a second pass merges the blocks' partial lists. Memory: B * ceil(N / block) * min(k, block)
// candidates plus one [rows, block] score tile per task, never B x N.
std::tuple<at::Tensor, at::Tensor> score_topk_cpu(const at::Tensor& query, const at::Tensor& item_table, int64_t k,
                                                  const std::optional<at::Tensor>& exclude_ids) {
  check_score_topk_args(query, item_table, k, exclude_ids);
  const int64_t batch = query.size(0), num_items = item_table.size(0);
  const auto excluded = excluded_per_row(exclude_ids, batch, num_items, k);
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor table = item_table.contiguous();
  const int64_t item_blocks = (num_items + kTopkItemBlock - 1) / kTopkItemBlock;
  const int64_t row_blocks = (batch + kTopkRowBlock - 1) / kTopkRowBlock;
  const int64_t kp = std::min(k, kTopkItemBlock);
  std::vector<Scored> partial(batch * item_blocks * kp);
  std::vector<int64_t> partial_count(batch * item_blocks);

  at::parallel_for(0, item_blocks * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Scored> heap;  // worst candidate on top
    heap.reserve(kp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ib = task / row_blocks, rb = task % row_blocks;
      const int64_t i0 = ib * kTopkItemBlock, items = std::min(kTopkItemBlock, num_items - i0);
      const int64_t r0 = rb * kTopkRowBlock, rows = std::min(kTopkRowBlock, batch - r0);
      const at::Tensor tile = at::mm(q.narrow(0, r0, rows), table.narrow(0, i0, items).to(at::kFloat).t()).contiguous();
      const float* scores = tile.const_data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r0 + r;
        auto skip = std::lower_bound(excluded[b].begin(), excluded[b].end(), i0);
        heap.clear();
        for (int64_t i = 0; i < items; ++i) {
          const Scored c{scores[r * items + i], i0 + i};
          if (skip != excluded[b].end() && *skip == c.id) {
            ++skip;
            continue;
          }
          if (static_cast<int64_t>(heap.size()) < kp) {
            heap.push_back(c);
            std::push_heap(heap.begin(), heap.end(), better);
          } else if (better(c, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = c;
            std::push_heap(heap.begin(), heap.end(), better);
          }
        }
        std::copy(heap.begin(), heap.end(), partial.begin() + (b * item_blocks + ib) * kp);
        partial_count[b * item_blocks + ib] = static_cast<int64_t>(heap.size());
      }
    }
  });

  at::Tensor ids = at::empty({batch, k}, query.options().dtype(at::kLong));
  at::Tensor values = at::empty({batch, k}, query.options().dtype(at::kFloat));
  int64_t* ids_p = ids.mutable_data_ptr<int64_t>();
  float* values_p = values.mutable_data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<Scored> all;
    for (int64_t b = begin; b < end; ++b) {
      all.clear();
      for (int64_t ib = 0; ib < item_blocks; ++ib) {
        const auto first = partial.begin() + (b * item_blocks + ib) * kp;
        all.insert(all.end(), first, first + partial_count[b * item_blocks + ib]);
      }
      std::partial_sort(all.begin(), all.begin() + k, all.end(), better);  // k <= all.size(): checked above
      for (int64_t j = 0; j < k; ++j) {
        ids_p[b * k + j] = all[j].id;
        values_p[b * k + j] = all[j].score;
      }
    }
  });
  return {ids, values};
}

template <typename scalar_t>
float dot(const float* q, const scalar_t* row, int64_t d, float* buffer) {
  using fVec = at::vec::Vectorized<float>;
  if (d == 0) return 0.f;
  const float* r = buffer;
  if constexpr (std::is_same_v<scalar_t, float>) {
    r = row;
  } else {
    std::transform(row, row + d, buffer, [](scalar_t x) { return static_cast<float>(x); });
  }
  return at::vec::map2_reduce_all<float>([](fVec a, fVec b) { return a * b; }, [](fVec a, fVec b) { return a + b; }, q,
                                         r, d);
}

at::Tensor score_candidates_cpu(const at::Tensor& query, const at::Tensor& item_table, const at::Tensor& candidates) {
  check_score_candidates_args(query, item_table, candidates);
  const at::Tensor cands = candidates.contiguous();
  check_ids("score_candidates", "candidate", cands, item_table.size(0));
  const int64_t num_candidates = cands.size(1), d = item_table.size(1);
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor table = item_table.contiguous();
  at::Tensor out = at::empty(cands.sizes(), query.options().dtype(at::kFloat));
  const int64_t* cand_p = cands.const_data_ptr<int64_t>();
  const float* q_p = q.const_data_ptr<float>();
  float* out_p = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "score_candidates_cpu", [&] {
    const scalar_t* table_p = table.const_data_ptr<scalar_t>();
    at::parallel_for(0, cands.numel(), grain(d), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : d);
      for (int64_t i = begin; i < end; ++i) {
        out_p[i] = dot(q_p + (i / num_candidates) * d, table_p + cand_p[i] * d, d, buffer.data());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(speeder, CPU, m) {
  m.impl("assemble_inputs_embeds", &assemble_inputs_embeds_cpu);
  m.impl("score_topk", &score_topk_cpu);
  m.impl("score_candidates", &score_candidates_cpu);
}

}  // namespace speeder::ops
