// CUDA kernels of the speeder ops as plain CUDA (raw pointers, no ATen): kernels.cu implements them, cuda.cpp is
// the ATen glue (checks, allocation, streams). All tensors are contiguous; ids are int64.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace speeder::cuda {

enum class DType { Float32, Float16, BFloat16 };

struct AssembleArgs {
  DType dtype;  // of the four tables and the output
  const void* item_table;           // [N, dim]
  const void* recency;              // [R >= width, dim]
  const void* candidate_embedding;  // [dim]
  const void* embed_weight;         // [V, dim]
  const int64_t* history;           // [batch, width]
  const int64_t* history_len;       // [batch]
  const int64_t* candidates;        // [batch, num_candidates]
  const int64_t* template_ids;      // [prefix + middle + suffix + 1]
  int64_t batch, width, num_candidates, length, dim, prefix, middle, suffix;
  void* out;            // [batch, length, dim]
  int32_t* item_idx;    // [batch, length]
  bool* token_mask;     // [batch, length]
};

// One warp per output row, 16-byte vector loads and stores when dim and the pointers allow it.
cudaError_t assemble_inputs_embeds(const AssembleArgs& args, cudaStream_t stream);

// out[i] = query[i / num_candidates] . item_table[candidates[i]], one warp per (row, candidate).
cudaError_t score_candidates(DType dtype, const float* query, const void* item_table, const int64_t* candidates,
                             int64_t batch, int64_t num_candidates, int64_t dim, float* out, cudaStream_t stream);

constexpr int64_t kTopkTile = 1024;  // items per block of the first top-k pass; also the largest k

struct TopkArgs {
  DType dtype;  // of item_table
  const float* query;          // [batch, dim]
  const void* item_table;      // [num_items, dim]
  const int64_t* exclude_ids;  // [batch, num_exclude] (negative = none) or nullptr
  int64_t batch, num_items, dim, num_exclude, k;  // 1 <= k <= min(num_items, kTopkTile)
  float* partial_scores;       // workspace: topk_workspace_entries(batch, num_items, k) each
  int64_t* partial_ids;
  int64_t* ids;                // [batch, k], best first (score descending, lower id first on ties)
  float* scores;               // [batch, k]
};

inline int64_t topk_workspace_entries(int64_t batch, int64_t num_items, int64_t k) {
  return batch * ((num_items + kTopkTile - 1) / kTopkTile) * std::min(k, kTopkTile);
}

// Pass 1: per (row, tile of kTopkTile items) the scores, excluded ids dropped, bitonic-sorted in shared memory,
// the best min(k, tile) kept. Pass 2: per row, the tiles' lists merged (bitonic merges in shared memory).
cudaError_t score_topk(const TopkArgs& args, cudaStream_t stream);

}  // namespace speeder::cuda
