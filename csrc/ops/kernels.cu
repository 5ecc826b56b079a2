// CUDA kernels of the speeder ops (declared in kernels.h). Plain CUDA: no ATen, no torch headers.
#include "kernels.h"
#include "layout.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace speeder::cuda {
namespace {

using ops::locate;
using ops::Slot;
using ops::Source;

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N elements loaded / stored as one access: 16 bytes (ld.global.v4) for the vectorised kernels, split into
// 16-byte accesses when larger (Pack<float, 8> next to 8 halves).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// query[0 .. dim) . row[0 .. dim) split over the lanes of a warp; the full sum in every lane.
template <typename T, int VEC>
__device__ __forceinline__ float warp_dot(const float* query, const T* row, int64_t dim, int lane) {
  using P = Pack<T, VEC>;
  using Q = Pack<float, VEC>;
  const P* r = reinterpret_cast<const P*>(row);
  const Q* q = reinterpret_cast<const Q*>(query);
  float acc = 0.f;
  for (int64_t c = lane; c < dim / VEC; c += kWarp) {
    const P p = r[c];
    const Q w = q[c];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc += w.v[j] * to_float(p.v[j]);
  }
  return warp_sum(acc);
}

// True when `bytes`-wide accesses are aligned for every pointer.
bool aligned(int64_t bytes, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  }
  return true;
}

// ---- assemble_inputs_embeds --------------------------------------------------------------------------------

constexpr int kAssembleWarps = 8;  // rows per block

template <typename T, int VEC>
__global__ void __launch_bounds__(kAssembleWarps * kWarp) assemble_kernel(const AssembleArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAssembleWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= a.batch * a.length) return;
  const int64_t b = row / a.length, n = a.history_len[b];
  const Slot slot = locate(row % a.length, n, a.num_candidates, a.prefix, a.middle, a.suffix);
  if (lane == 0) {
    a.item_idx[row] = slot.item_idx;
    a.token_mask[row] = slot.source != Source::Padding;
  }
  const T* items = static_cast<const T*>(a.item_table);
  const T* src = nullptr;  // the row copied (nullptr: zeros)
  const T* add = nullptr;  // the row added to it (recency or the candidate embedding)
  switch (slot.source) {
    case Source::Template:
      src = static_cast<const T*>(a.embed_weight) + a.template_ids[slot.index] * a.dim;
      break;
    case Source::History:
      src = items + a.history[b * a.width + slot.index] * a.dim;
      add = static_cast<const T*>(a.recency) + (n - 1 - slot.index) * a.dim;
      break;
    case Source::Candidate:
      src = items + a.candidates[b * a.num_candidates + slot.index] * a.dim;
      add = static_cast<const T*>(a.candidate_embedding);
      break;
    case Source::Padding:
      break;
  }
  using P = Pack<T, VEC>;
  P* dst = reinterpret_cast<P*>(static_cast<T*>(a.out) + row * a.dim);
  for (int64_t c = lane; c < a.dim / VEC; c += kWarp) {  // consecutive lanes, consecutive 16-byte vectors
    P v;
    if (src == nullptr) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(0.f);
    } else {
      v = reinterpret_cast<const P*>(src)[c];
      if (add != nullptr) {
        const P w = reinterpret_cast<const P*>(add)[c];
#pragma unroll
        for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(to_float(v.v[j]) + to_float(w.v[j]));
      }
    }
    dst[c] = v;
  }
}

template <typename T>
cudaError_t launch_assemble(const AssembleArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.length;
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((rows + kAssembleWarps - 1) / kAssembleWarps));
  const bool vectorised = a.dim % kVec<T> == 0 &&
      aligned(16, {a.item_table, a.recency, a.candidate_embedding, a.embed_weight, a.out});
  if (vectorised) {
    assemble_kernel<T, kVec<T>><<<grid, kAssembleWarps * kWarp, 0, stream>>>(a);
  } else {
    assemble_kernel<T, 1><<<grid, kAssembleWarps * kWarp, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// ---- score_candidates --------------------------------------------------------------------------------------

constexpr int kScoreWarps = 8;

template <typename T, int VEC>
__global__ void __launch_bounds__(kScoreWarps * kWarp)
    score_candidates_kernel(const float* query, const T* table, const int64_t* candidates, int64_t total,
                            int64_t num_candidates, int64_t dim, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kScoreWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= total) return;
  const float s = warp_dot<T, VEC>(query + (i / num_candidates) * dim, table + candidates[i] * dim, dim, lane);
  if (lane == 0) out[i] = s;
}

template <typename T>
cudaError_t launch_score_candidates(const float* query, const void* item_table, const int64_t* candidates,
                                    int64_t batch, int64_t num_candidates, int64_t dim, float* out,
                                    cudaStream_t stream) {
  const int64_t total = batch * num_candidates;
  if (total == 0) return cudaSuccess;
  const T* table = static_cast<const T*>(item_table);
  const dim3 grid(static_cast<unsigned>((total + kScoreWarps - 1) / kScoreWarps));
  if (dim % kVec<T> == 0 && aligned(16, {query, item_table})) {
    score_candidates_kernel<T, kVec<T>><<<grid, kScoreWarps * kWarp, 0, stream>>>(query, table, candidates, total,
                                                                                 num_candidates, dim, out);
  } else {
    score_candidates_kernel<T, 1><<<grid, kScoreWarps * kWarp, 0, stream>>>(query, table, candidates, total,
                                                                          num_candidates, dim, out);
  }
  return cudaGetLastError();
}

// ---- score_topk --------------------------------------------------------------------------------------------

constexpr int kTile = static_cast<int>(kTopkTile);
constexpr int kTopkThreads = 256;
constexpr int kMergeThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// Result order: higher score first, lower id first on ties; invalid entries (id < 0: excluded, past the catalog
// end, padding) after every valid one.
__device__ __forceinline__ bool better(float sa, int64_t ia, float sb, int64_t ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  return sa > sb || (sa == sb && ia < ib);
}

__device__ __forceinline__ void compare_swap(float* score, int64_t* id, int lo, int hi, bool best_first) {
  const bool swap = best_first ? better(score[hi], id[hi], score[lo], id[lo])
                               : better(score[lo], id[lo], score[hi], id[hi]);
  if (swap) {
    const float s = score[lo];
    score[lo] = score[hi];
    score[hi] = s;
    const int64_t i = id[lo];
    id[lo] = id[hi];
    id[hi] = i;
  }
}

// Sorts n (a power of two) shared entries best first. Called by every thread of the block.
__device__ void bitonic_sort(float* score, int64_t* id, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));  // bit `stride` clear; its partner is lo + stride
        compare_swap(score, id, lo, lo + stride, (lo & size) == 0);
      }
      __syncthreads();
    }
  }
}

// Sorts a bitonic sequence of n (a power of two) shared entries, best-first half then worst-first half, best first.
__device__ void bitonic_merge(float* score, int64_t* id, int n) {
  for (int stride = n >> 1; stride > 0; stride >>= 1) {
    for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
      const int lo = 2 * i - (i & (stride - 1));
      compare_swap(score, id, lo, lo + stride, true);
    }
    __syncthreads();
  }
}

// Grid (tiles, rows): scores of one tile of items for one query row, excluded ids dropped, sorted; the best kp kept.
template <typename T, int VEC>
__global__ void __launch_bounds__(kTopkThreads) tile_topk_kernel(const TopkArgs a, int64_t row0, int64_t kp) {
  extern __shared__ __align__(16) float s_query[];  // [dim]
  __shared__ float s_score[kTile];
  __shared__ int64_t s_id[kTile];
  const int64_t b = row0 + blockIdx.y, tile = blockIdx.x, i0 = tile * kTile;
  for (int64_t c = threadIdx.x; c < a.dim; c += blockDim.x) s_query[c] = a.query[b * a.dim + c];
  __syncthreads();

  const T* table = static_cast<const T*>(a.item_table);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int i = warp; i < kTile; i += kTopkThreads / kWarp) {  // one warp per item: coalesced row reads
    const int64_t item = i0 + i;
    const float s = item < a.num_items ? warp_dot<T, VEC>(s_query, table + item * a.dim, a.dim, lane) : 0.f;
    if (lane == 0) {
      s_score[i] = s;
      s_id[i] = item < a.num_items ? item : -1;
    }
  }
  __syncthreads();
  if (a.exclude_ids != nullptr) {
    for (int64_t e = threadIdx.x; e < a.num_exclude; e += blockDim.x) {
      const int64_t id = a.exclude_ids[b * a.num_exclude + e];
      if (id >= i0 && id < i0 + kTile) s_id[id - i0] = -1;  // repeated ids write the same value
    }
    __syncthreads();
  }
  bitonic_sort(s_score, s_id, kTile);
  const int64_t offset = (b * gridDim.x + tile) * kp;
  for (int64_t j = threadIdx.x; j < kp; j += blockDim.x) {
    a.partial_scores[offset + j] = s_score[j];
    a.partial_ids[offset + j] = s_id[j];
  }
}

// One block per row: the running top `width` (first half, best first) merged with each tile's list, loaded
// worst first into the second half so that the whole is bitonic.
__global__ void __launch_bounds__(kMergeThreads) merge_topk_kernel(const TopkArgs a, int64_t tiles, int64_t kp, int width) {
  __shared__ float s_score[2 * kTile];
  __shared__ int64_t s_id[2 * kTile];
  const int64_t b = blockIdx.x;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    s_score[i] = -INFINITY;
    s_id[i] = -1;
  }
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = (b * tiles + tile) * kp;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
      const int j = width - 1 - i;  // the tile's j-th best
      s_score[width + i] = j < kp ? a.partial_scores[offset + j] : -INFINITY;
      s_id[width + i] = j < kp ? a.partial_ids[offset + j] : -1;
    }
    __syncthreads();
    bitonic_merge(s_score, s_id, 2 * width);
  }
  for (int64_t j = threadIdx.x; j < a.k; j += blockDim.x) {
    a.ids[b * a.k + j] = s_id[j];
    a.scores[b * a.k + j] = s_score[j];
  }
}

template <typename T>
cudaError_t launch_score_topk(const TopkArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  const int64_t tiles = (a.num_items + kTile - 1) / kTile;
  const int64_t kp = a.k < kTile ? a.k : kTile;
  int width = 1;
  while (width < kp) width <<= 1;
  const size_t shared = static_cast<size_t>(a.dim) * sizeof(float);
  const bool vectorised = a.dim % kVec<T> == 0 && aligned(16, {a.query, a.item_table});
  const auto kernel = vectorised ? tile_topk_kernel<T, kVec<T>> : tile_topk_kernel<T, 1>;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
      e != cudaSuccess) {
    return e;
  }
  for (int64_t row0 = 0; row0 < a.batch; row0 += kMaxGridY) {
    const int64_t rows = a.batch - row0 < kMaxGridY ? a.batch - row0 : kMaxGridY;
    kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(rows)), kTopkThreads, shared, stream>>>(a, row0, kp);
  }
  merge_topk_kernel<<<static_cast<unsigned>(a.batch), kMergeThreads, 0, stream>>>(a, tiles, kp, width);
  return cudaGetLastError();
}

}  // namespace

cudaError_t assemble_inputs_embeds(const AssembleArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::Float32: return launch_assemble<float>(args, stream);
    case DType::Float16: return launch_assemble<__half>(args, stream);
    case DType::BFloat16: return launch_assemble<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t score_candidates(DType dtype, const float* query, const void* item_table, const int64_t* candidates,
                             int64_t batch, int64_t num_candidates, int64_t dim, float* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch_score_candidates<float>(query, item_table, candidates, batch, num_candidates, dim, out, stream);
    case DType::Float16:
      return launch_score_candidates<__half>(query, item_table, candidates, batch, num_candidates, dim, out, stream);
    case DType::BFloat16:
      return launch_score_candidates<__nv_bfloat16>(query, item_table, candidates, batch, num_candidates, dim, out,
                                                    stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t score_topk(const TopkArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::Float32: return launch_score_topk<float>(args, stream);
    case DType::Float16: return launch_score_topk<__half>(args, stream);
    case DType::BFloat16: return launch_score_topk<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace speeder::cuda
