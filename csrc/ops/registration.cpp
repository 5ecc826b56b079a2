// The speeder op library: schemas here, kernels in cpu.cpp (and cuda.cpp when built with CUDA), Meta kernels (shapes
// only, for torch.export / torch.compile / AOTInductor) in meta.cpp. Python wrappers: speeder_rt/kernels/cpp_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(speeder, m) {
  // The inference prompt: inputs_embeds [B, P+W+Mi+K+S+1, d], item_idx int32 and token_mask bool [B, L].
  m.def("assemble_inputs_embeds(Tensor item_table, Tensor history, Tensor history_len, Tensor candidates, "
        "Tensor recency, Tensor candidate_embedding, Tensor template_ids, Tensor embed_weight, "
        "int prefix, int middle, int suffix) -> (Tensor inputs_embeds, Tensor item_idx, Tensor token_mask)");
  // Full-catalog top-k of query . item_table^T (float32), excluded ids (negative = none) never returned.
  m.def("score_topk(Tensor query, Tensor item_table, int k, Tensor? exclude_ids=None) -> (Tensor ids, Tensor scores)");
  // query . item_table[candidates]^T per row: float32 [B, K].
  m.def("score_candidates(Tensor query, Tensor item_table, Tensor candidates) -> Tensor");
}
