// CUDA kernels of the gathered low-rank ops. Needs only the CUDA toolkit (no ATen), so
// csrc/cuda/compile_check.sh compiles them with nvcc on a machine without torch or GPU.
//
//   shrink: t[i, q]  = x[i] . A[s, q]                    q < r;  t[i, q] = 0 for r <= q < R
//   expand: y[i, o] += w[i] * scale[s] * sum_{q<r} t[i, q] * B[s, o, q]   w = weight (null: 1)
//   s = index[i] (-1: no adapter), r = ranks[s] (R = max_rank when ranks is null)
//   x (rows, in), A (slots, R, in), t (rows, R), B (slots, out, R), y (rows, out), all contiguous.
//
// Work comes in items of kRows rows that share one slot:
//   BGMV (kRows = 1): one item per row, the slot read on the device; decode batches.
//   SGMV (kRows > 1): a segment's rows grouped into items (Routing::items), so each weight
//     vector loaded feeds kRows rows; prefill batches. The item lists come from
//     sgmv_plan_kernel, on the device (no host sync, capturable).
//   Fused decode (lora_fused_decode_kernel, sm_90+): shrink and expand in one launch.
// Both accumulate in fp32 (fp64 for fp64), load 16-byte vectors when VEC > 1 (the launcher
// checks sizes and alignment), never read A/B padding beyond the slot's rank (B vectors
// straddling r are masked), and are safe for any index/ranks values: a slot outside
// [0, slots) acts as -1 and a rank is clamped to [0, R], so nothing is read out of bounds.
// Such values are also reported, without a host sync, through Routing::errors (the plan
// kernel checks every row of an SGMV call, the BGMV kernels the row of each block).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <cstring>

namespace adapterhub {
namespace cuda {

// ---- element types ------------------------------------------------------------------

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Elements per 16-byte vector: 8 for fp16/bf16, 4 for fp32, 2 for fp64.
template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

template <int Bytes>
struct RawOf;
template <>
struct RawOf<16> {
  using type = uint4;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<4> {
  using type = unsigned int;
};
template <>
struct RawOf<2> {
  using type = unsigned short;
};

template <typename T, int N>
struct Vec {
  T v[N];
};

// N elements at p through the read-only cache, or zeros when !pred (p is not touched then).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p, bool pred) {
  using Raw = typename RawOf<sizeof(T) * N>::type;
  Raw raw{};
  if (pred) raw = __ldg(reinterpret_cast<const Raw*>(p));
  Vec<T, N> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

// a[m] for a run-time m, by compile-time indices only (a run-time index would move `a` to local memory).
template <typename V, int M>
__device__ __forceinline__ V pick(const V (&a)[M], int m) {
  V v = a[0];
#pragma unroll
  for (int k = 1; k < M; ++k) v = k == m ? a[k] : v;
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v, int width = 32) {
  for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- routing ------------------------------------------------------------------------

// Where the kernels report a routing value out of its range, without a host sync: the first
// report claims `claim` (device memory, 0 = free) and writes `record` (pinned host memory mapped
// into the device), which the host reads at its next op call (lora_cuda.cu, raise_pending).
// record: [ready, op, what, position, value, slots, max_rank]; claim == nullptr: no reports.
enum RoutingErrorKind : int64_t { kBadIndex = 1, kBadRank = 2 };
constexpr int kRecordFields = 7;
struct ErrorSink {
  unsigned long long* claim;
  int64_t* record;
  int64_t op;  // which op reports (lora_cuda.cu names them)
};

struct Routing {
  const int64_t* index;  // (rows,) slot per row, -1 = no adapter
  const int64_t* ranks;  // (slots,) rank in use per slot, or nullptr: every slot has max_rank
  const int64_t* items;  // (items * kRows,) row ids grouped by slot, -1 pads; nullptr: item w is row w
  int64_t slots;
  int64_t max_rank;
  ErrorSink errors;
};

__device__ __forceinline__ void report_error(const Routing& route, int64_t what, int64_t position, int64_t value) {
  const ErrorSink& e = route.errors;
  if (e.claim == nullptr || atomicCAS(e.claim, 0ull, 1ull) != 0ull) return;
  volatile int64_t* rec = e.record;
  rec[1] = e.op;
  rec[2] = what;
  rec[3] = position;
  rec[4] = value;
  rec[5] = route.slots;
  rec[6] = route.max_rank;
  __threadfence_system();  // the fields reach the host before `ready`
  rec[0] = 1;
}

__device__ __forceinline__ int64_t slot_of(const Routing& route, int64_t row) {
  const int64_t s = route.index[row];
  return (s >= 0 && s < route.slots) ? s : -1;
}

__device__ __forceinline__ int64_t rank_of(const Routing& route, int64_t slot) {
  if (slot < 0) return 0;
  if (route.ranks == nullptr) return route.max_rank;
  const int64_t r = route.ranks[slot];
  return r < 0 ? 0 : (r > route.max_rank ? route.max_rank : r);
}

// Reports row's index value, and its slot's rank, when out of range (the host check's messages).
__device__ __forceinline__ void check_row(const Routing& route, int64_t row) {
  const int64_t s = route.index[row];
  if (s < -1 || s >= route.slots) {
    report_error(route, kBadIndex, row, s);
  } else if (s >= 0 && route.ranks != nullptr && (route.ranks[s] < 0 || route.ranks[s] > route.max_rank)) {
    report_error(route, kBadRank, s, route.ranks[s]);
  }
}

// BGMV (no item lists): the first thread of the first block of each row checks that row.
__device__ __forceinline__ void check_bgmv_row(const Routing& route) {
  if (route.items == nullptr && blockIdx.y == 0 && threadIdx.x == 0) check_row(route, blockIdx.x);
}

// Rows of item w and their shared slot (that of the first row). A row is valid when it
// exists and routes to that slot, so a malformed item list can only skip rows.
template <int M>
__device__ __forceinline__ int64_t item_rows(const Routing& route, int64_t w, int64_t (&row)[M], bool (&valid)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) row[m] = route.items != nullptr ? route.items[w * M + m] : w * M + m;
  const int64_t slot = row[0] >= 0 ? slot_of(route, row[0]) : -1;
#pragma unroll
  for (int m = 0; m < M; ++m) valid[m] = row[m] >= 0 && (m == 0 || slot_of(route, row[m]) == slot);
  return slot;
}

// ---- configurations -----------------------------------------------------------------

// Shrink: a block computes kRows rows x kRanks ranks of t; its warps split the in dimension.
// Each lane keeps kUnroll * (kRows + kRanks) vector loads in flight.
struct BgmvShrink {
  static constexpr int kRows = 1, kRanks = 4, kUnroll = 2;
};
struct SgmvShrink {
  static constexpr int kRows = 4, kRanks = 4, kUnroll = 2;
};
constexpr int kShrinkMaxWarps = 8;

// Expand: a block of kExpandThreads covers kOutputs outputs per lane group for kRows rows;
// a group of `lanes` lanes shares one output row of B (its rank entries).
struct BgmvExpand {
  static constexpr int kRows = 1, kOutputs = 4;
};
struct SgmvExpand {
  static constexpr int kRows = 4, kOutputs = 4;
};
constexpr int kExpandThreads = 256;

// ---- shrink -------------------------------------------------------------------------

template <typename T>
struct ShrinkParams {
  const T* x;      // (rows, in)
  const T* A;      // (slots, R, in)
  acc_t<T>* t;     // (rows, R)
  Routing route;
  int64_t in;
};

// grid (items, ceil(R / kRanks)), block 32 * warps (warps <= kShrinkMaxWarps).
template <typename T, int VEC, typename Cfg>
__global__ void __launch_bounds__(32 * kShrinkMaxWarps) lora_shrink_kernel(ShrinkParams<T> p) {
  constexpr int M = Cfg::kRows, Q = Cfg::kRanks, U = Cfg::kUnroll;
  using Acc = acc_t<T>;
  __shared__ Acc partial[kShrinkMaxWarps][M * Q];

  const int64_t R = p.route.max_rank;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * Q;
  int64_t row[M];
  bool valid[M];
  const int64_t slot = item_rows<M>(p.route, blockIdx.x, row, valid);
  const int64_t r = rank_of(p.route, slot);
  check_bgmv_row(p.route);

  if (q0 >= r) {  // whole block in the padding (or no adapter): zeros, no weight reads
    for (int i = threadIdx.x; i < M * Q; i += blockDim.x) {
      const int m = i / Q;
      const int64_t q = q0 + i % Q;
      if (pick(valid, m) && q < R) p.t[pick(row, m) * R + q] = Acc(0);
    }
    return;
  }

  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nvec = static_cast<int>(p.in / VEC);
  const int stride = warps * 32;
  const T* xrow[M];
  const T* arow[Q];
  bool live[Q];
#pragma unroll
  for (int m = 0; m < M; ++m) xrow[m] = p.x + (valid[m] ? row[m] : 0) * p.in;
#pragma unroll
  for (int j = 0; j < Q; ++j) {
    live[j] = q0 + j < r;
    arow[j] = p.A + (slot * R + (live[j] ? q0 + j : 0)) * p.in;
  }

  Acc acc[M][Q] = {};
  for (int base = warp * 32 + lane; base < nvec; base += stride * U) {
    Vec<T, VEC> xv[U][M], av[U][Q];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = base + u * stride;
#pragma unroll
      for (int m = 0; m < M; ++m) xv[u][m] = load_vec<T, VEC>(xrow[m] + k * VEC, k < nvec && valid[m]);
#pragma unroll
      for (int j = 0; j < Q; ++j) av[u][j] = load_vec<T, VEC>(arow[j] + k * VEC, k < nvec && live[j]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int e = 0; e < VEC; ++e)
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int j = 0; j < Q; ++j) acc[m][j] += to_acc(xv[u][m].v[e]) * to_acc(av[u][j].v[e]);
  }

#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      const Acc v = warp_sum(acc[m][j]);
      if (lane == 0) partial[warp][m * Q + j] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < M * Q; i += blockDim.x) {
    const int m = i / Q;
    const int64_t q = q0 + i % Q;
    if (!pick(valid, m) || q >= R) continue;
    Acc sum = 0;
    for (int w = 0; w < warps; ++w) sum += partial[w][i];
    p.t[pick(row, m) * R + q] = q < r ? sum : Acc(0);
  }
}

// ---- expand -------------------------------------------------------------------------

template <typename T>
struct ExpandParams {
  T* y;                 // (rows, out)
  const acc_t<T>* t;    // (rows, R)
  const T* B;           // (slots, out, R)
  const float* scale;   // (slots,)
  const float* weight;  // (rows,) per-row weight of the delta, or nullptr: 1 for every row
  Routing route;
  int64_t out;
  int lanes;            // lanes per output: a power of two in [1, 32]
};

// Lanes per output row of B for vectors of `vec` elements: enough for ceil(R / vec), at most 32.
inline int expand_lanes(int64_t max_rank, int vec) {
  const int64_t vectors = (max_rank + vec - 1) / vec;
  int lanes = 1;
  while (lanes < vectors && lanes < 32) lanes *= 2;
  return lanes;
}

// Outputs one expand block covers.
template <typename Cfg>
inline int64_t expand_outputs_per_block(int lanes) {
  return static_cast<int64_t>(kExpandThreads / lanes) * Cfg::kOutputs;
}

// grid (items, ceil(out / expand_outputs_per_block)), block kExpandThreads,
// dynamic shared memory kRows * R * sizeof(acc_t<T>) (the items' t rows).
template <typename T, int VEC, typename Cfg>
__global__ void __launch_bounds__(kExpandThreads, 2) lora_expand_kernel(ExpandParams<T> p) {
  constexpr int M = Cfg::kRows, OU = Cfg::kOutputs;
  using Acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  Acc* t_sh = reinterpret_cast<Acc*>(smem);  // (M, R), zero beyond the slot's rank

  const int64_t R = p.route.max_rank;
  int64_t row[M];
  bool valid[M];
  const int64_t slot = item_rows<M>(p.route, blockIdx.x, row, valid);
  const int64_t r = rank_of(p.route, slot);
  check_bgmv_row(p.route);
  if (r == 0) return;  // no adapter: y untouched, nothing read

  for (int64_t i = threadIdx.x; i < M * R; i += blockDim.x) {
    const int m = static_cast<int>(i / R);
    const int64_t q = i % R;
    t_sh[i] = (pick(valid, m) && q < r) ? p.t[pick(row, m) * R + q] : Acc(0);
  }
  __syncthreads();

  const int L = p.lanes, groups = blockDim.x / L;
  const int lg = threadIdx.x % L;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * groups * OU + threadIdx.x / L;
  const int64_t nvec = (r + VEC - 1) / VEC;
  const T* Bs = p.B + slot * p.out * R;

  Acc acc[OU][M] = {};
  for (int64_t pv = lg; pv < nvec; pv += L) {  // once per lane when R <= 32 * VEC
    Vec<T, VEC> bv[OU];
#pragma unroll
    for (int u = 0; u < OU; ++u) {
      const int64_t o = o0 + static_cast<int64_t>(u) * groups;
      bv[u] = load_vec<T, VEC>(Bs + (o < p.out ? o : 0) * R + pv * VEC, o < p.out);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t q = pv * VEC + e;
      Acc tq[M];
#pragma unroll
      for (int m = 0; m < M; ++m) tq[m] = t_sh[m * R + q];
#pragma unroll
      for (int u = 0; u < OU; ++u) {
        const Acc b = q < r ? to_acc(bv[u].v[e]) : Acc(0);  // B padding may hold anything
#pragma unroll
        for (int m = 0; m < M; ++m) acc[u][m] += tq[m] * b;
      }
    }
  }

  // Each row's coefficient, scale times its weight in Acc (weight 1: exactly scale, the unweighted bits).
  const Acc sc = static_cast<Acc>(p.scale[slot]);
  Acc coef[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    coef[m] = p.weight != nullptr && valid[m] ? sc * static_cast<Acc>(p.weight[row[m]]) : sc;
  }
#pragma unroll
  for (int u = 0; u < OU; ++u) {
    const int64_t o = o0 + static_cast<int64_t>(u) * groups;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const Acc v = warp_sum(acc[u][m], L);
      if (lg == 0 && o < p.out && valid[m]) {
        T* yo = p.y + row[m] * p.out + o;
        store(yo, to_acc(*yo) + coef[m] * v);
      }
    }
  }
}

// ---- SGMV plan ----------------------------------------------------------------------

// The item lists of an SGMV launch, built on the device in one block: rows grouped by slot (a
// counting sort), each group padded with -1 to a multiple of M rows, so item w is
// items[w * M .. w * M + M). Rows with no adapter, a rank-0 slot or an out-of-range value (reported)
// are left out; items past the groups are all -1 (the kernels skip them). Order within a group is
// unspecified (a row's result does not depend on it).
//   capacity >= rows + min(rows, slots) * (M - 1), a multiple of M: every grouping fits.
constexpr int kPlanThreads = 512;

struct PlanParams {
  Routing route;     // index, ranks, slots, max_rank, errors (items unused)
  int64_t rows;
  int32_t* start;    // (slots,) scratch: row count, then the group's first item entry
  int32_t* cursor;   // (slots,) scratch: rows placed so far
  int64_t* items;    // (capacity,) out
  int64_t capacity;
};

// The slot whose low-rank delta row `row` adds, or -1 (none, rank 0, or out of range).
__device__ __forceinline__ int64_t planned_slot(const Routing& route, int64_t row) {
  const int64_t s = slot_of(route, row);
  return rank_of(route, s) > 0 ? s : -1;
}

// grid 1, block kPlanThreads.
template <int M>
__global__ void __launch_bounds__(kPlanThreads) sgmv_plan_kernel(PlanParams p) {
  using Scan = cub::BlockScan<int64_t, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan;
  const int64_t slots = p.route.slots;
  for (int64_t s = threadIdx.x; s < slots; s += kPlanThreads) p.start[s] = p.cursor[s] = 0;
  for (int64_t i = threadIdx.x; i < p.capacity; i += kPlanThreads) p.items[i] = -1;
  __syncthreads();
  for (int64_t row = threadIdx.x; row < p.rows; row += kPlanThreads) {
    check_row(p.route, row);
    const int64_t s = planned_slot(p.route, row);
    if (s >= 0) atomicAdd(&p.start[s], 1);
  }
  __syncthreads();
  // Each thread owns a run of consecutive slots: padded counts -> exclusive prefix over the block.
  const int64_t per = (slots + kPlanThreads - 1) / kPlanThreads;
  const int64_t lo = min(static_cast<int64_t>(threadIdx.x) * per, slots), hi = min(lo + per, slots);
  int64_t mine = 0;
  for (int64_t s = lo; s < hi; ++s) mine += (p.start[s] + M - 1) / M * M;
  int64_t offset = 0;
  Scan(scan).ExclusiveSum(mine, offset);
  for (int64_t s = lo; s < hi; ++s) {
    const int64_t padded = (p.start[s] + M - 1) / M * M;
    p.start[s] = static_cast<int32_t>(offset);
    offset += padded;
  }
  __syncthreads();
  for (int64_t row = threadIdx.x; row < p.rows; row += kPlanThreads) {
    const int64_t s = planned_slot(p.route, row);
    if (s >= 0) p.items[p.start[s] + atomicAdd(&p.cursor[s], 1)] = row;
  }
}

// ---- fused decode (sm_90+: thread block clusters) ------------------------------------

// y[i] += w[i] * scale[s] * (x[i] @ A[s, :r].T) @ B[s, :, :r].T in one launch, for decode batches:
// a cluster of kFusedCluster blocks per row. Block b shrinks the b-th chunk of `in` into partial
// sums of t in its shared memory; after a cluster barrier every block adds up all blocks' partials
// (distributed shared memory) into the whole t, then expands its own b-th chunk of `out`. So x, A
// and B are each read once per row, with no t round trip through global memory and no second
// launch. Same routing rules as the other kernels (a bad slot acts as -1 and is reported).
constexpr int kFusedCluster = 8;
constexpr int kFusedThreads = 256;

template <typename T>
struct FusedParams {
  const T* x;           // (rows, in)
  const T* A;           // (slots, R, in)
  const T* B;           // (slots, out, R)
  T* y;                 // (rows, out)
  const float* scale;   // (slots,)
  const float* weight;  // (rows,) or nullptr: 1
  Routing route;        // items unused: cluster c is row c
  int64_t in;
  int64_t out;
};

// Dynamic shared memory: 2 * R accumulators (this block's partial t, then the whole t).
template <typename T>
inline size_t fused_smem_bytes(int64_t max_rank) {
  return 2 * static_cast<size_t>(max_rank) * sizeof(acc_t<T>);
}

// grid (rows * kFusedCluster), cluster (kFusedCluster), block kFusedThreads; VEC divides in and R.
template <typename T, int VEC>
__global__ void __launch_bounds__(kFusedThreads) lora_fused_decode_kernel(FusedParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using Acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t R = p.route.max_rank;
  Acc* partial = reinterpret_cast<Acc*>(smem);  // (R,) this block's share of t
  Acc* t = partial + R;                          // (R,) all of t, zero from r on

  cg::cluster_group cluster = cg::this_cluster();
  const unsigned int part = cluster.block_rank();
  const int64_t row = blockIdx.x / kFusedCluster;
  if (part == 0 && threadIdx.x == 0) check_row(p.route, row);
  const int64_t slot = slot_of(p.route, row);
  // 0: no adapter (every block of the cluster reads the same slot). The blocks still meet at both
  // barriers: were the index rewritten while they read it, none may wait for one that left.
  const int64_t r = rank_of(p.route, slot);

  // Shrink this block's chunk of `in`: warp w takes ranks w, w + warps, ...
  const int warps = kFusedThreads / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t nvec = p.in / VEC, per = (nvec + kFusedCluster - 1) / kFusedCluster;
  const int64_t lo = min(static_cast<int64_t>(part) * per, nvec), hi = min(lo + per, nvec);
  const T* xrow = p.x + row * p.in;
  for (int64_t q = warp; q < r; q += warps) {
    const T* arow = p.A + (slot * R + q) * p.in;
    Acc acc = 0;
    for (int64_t v = lo + lane; v < hi; v += 32) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(xrow + v * VEC, true);
      const Vec<T, VEC> av = load_vec<T, VEC>(arow + v * VEC, true);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc += to_acc(xv.v[e]) * to_acc(av.v[e]);
    }
    acc = warp_sum(acc);
    if (lane == 0) partial[q] = acc;
  }
  cluster.sync();  // every block's partial t is written

  for (int64_t q = threadIdx.x; q < R; q += kFusedThreads) {
    Acc sum = 0;
    if (q < r) {
      for (unsigned int b = 0; b < kFusedCluster; ++b) sum += cluster.map_shared_rank(partial, b)[q];
    }
    t[q] = sum;
  }
  cluster.sync();  // all reads of other blocks' partials are done (none may exit before), t is whole

  if (r == 0) return;  // after the last barrier: nobody reads this block's shared memory any more

  // Expand this block's chunk of `out`: a thread per output, its B row read in vectors.
  const Acc coef = static_cast<Acc>(p.scale[slot]) * (p.weight != nullptr ? static_cast<Acc>(p.weight[row]) : Acc(1));
  const int64_t per_out = (p.out + kFusedCluster - 1) / kFusedCluster;
  const int64_t o_lo = min(static_cast<int64_t>(part) * per_out, p.out), o_hi = min(o_lo + per_out, p.out);
  const int64_t rvec = (r + VEC - 1) / VEC;
  const T* Bs = p.B + slot * p.out * R;
  for (int64_t o = o_lo + threadIdx.x; o < o_hi; o += kFusedThreads) {
    Acc acc = 0;
    for (int64_t pv = 0; pv < rvec; ++pv) {
      const Vec<T, VEC> bv = load_vec<T, VEC>(Bs + o * R + pv * VEC, true);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t q = pv * VEC + e;
        if (q < r) acc += t[q] * to_acc(bv.v[e]);  // B padding may hold anything
      }
    }
    T* yo = p.y + row * p.out + o;
    store(yo, to_acc(*yo) + coef * acc);
  }
#endif
}

}  // namespace cuda
}  // namespace adapterhub
