// The prompt layout of speeder_rt.model.prompt.layout for one position, shared by the CPU and CUDA kernels.
//
//   [prefix P] [history h_0 .. h_{n-1}] [middle Mi] [candidates c_0 .. c_{K-1}] [suffix S] [PRED] [padding]
//
// Template rows index the concatenated template ids (prefix + middle + suffix + PRED). Item index (SPAE):
// prefix 0; history slot j (0-based) j + 1; middle n; candidates, suffix and PRED n + 1; padding 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPEEDER_HOST_DEVICE __host__ __device__
#else
#define SPEEDER_HOST_DEVICE
#endif

namespace speeder::ops {

enum class Source : int32_t { Template, History, Candidate, Padding };

struct Slot {
  Source source;
  int64_t index;     // template row, history slot j, or candidate c
  int32_t item_idx;  // SPAE item index
};

// Position t of a sample with n real history items, K candidates and template sizes (P, Mi, S).
SPEEDER_HOST_DEVICE inline Slot locate(int64_t t, int64_t n, int64_t num_candidates, int64_t prefix, int64_t middle,
                                       int64_t suffix) {
  const int64_t end_hist = prefix + n;
  const int64_t end_mid = end_hist + middle;
  const int64_t end_cand = end_mid + num_candidates;
  const int64_t end_suf = end_cand + suffix;
  const auto after = static_cast<int32_t>(n + 1);
  if (t < prefix) return {Source::Template, t, 0};
  if (t < end_hist) return {Source::History, t - prefix, static_cast<int32_t>(t - prefix + 1)};
  if (t < end_mid) return {Source::Template, prefix + (t - end_hist), static_cast<int32_t>(n)};
  if (t < end_cand) return {Source::Candidate, t - end_mid, after};
  if (t < end_suf) return {Source::Template, prefix + middle + (t - end_cand), after};
  if (t == end_suf) return {Source::Template, prefix + middle + suffix, after};  // PRED
  return {Source::Padding, 0, 0};
}

}  // namespace speeder::ops
