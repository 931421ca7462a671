// CUDA gaze_attention forward on tensor cores, for many query rows (prefill and
// training), where every query position has its own selection.
//
// A thread block owns a tile of up to kTileRows query rows: the query heads of
// one selection head (the G heads of a KV head for a shared selection, else one
// head) at `positions` consecutive query positions; row r is position
// r / heads, head r % heads. Each warp owns 16 rows: one MMA row block.
//
//   1. Setup: the slots of the tile's selections become (position, region)
//      entries, the contract's rules applied (slot_taken), sorted; their
//      distinct regions, ascending, are the tile's *union*.
//   2. The tile's keys are the fixed tokens, then the tokens of the union, in
//      steps of kTileKeys. Each step finds its keys' positions, then the
//      multiplicity of each key for each position's query: 1 for a fixed token,
//      the number of times its region was taken for a region token, 0 past the
//      causal limit or outside [0, N). A step that no row sees is skipped (fixed
//      tokens past the tile's causal limits cost no math).
//   3. The step's K and V rows are gathered into shared memory; each warp
//      computes S = Q K^T with mma.sync (fp16/bf16 in, fp32 out), masks and
//      weights it by the multiplicities, updates the base-2 online softmax in
//      registers and adds P V with mma.sync (P rounded to the input type, as
//      FlashAttention does).
// The rows of a tile share every K/V read, so the kernel pays for the union of
// their selections: neighbouring text tokens mostly pick the same regions.
// Nothing is atomic: the result repeats bitwise.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../common/op_args.h"
#include "attention_common.cuh"
#include "mma.cuh"

namespace gaze::cuda {
namespace {

constexpr int kTileThreads = 128;
constexpr int kTileWarps = kTileThreads / 32;
constexpr int kTileRows = 16 * kTileWarps;  // query rows per block
constexpr int kTileKeys = 64;               // keys per step (== kTileRows: one tile shape)
constexpr int kMaxEntries = 2048;           // positions * topk per block
constexpr int kRowPad = 8;  // 16-bit elements after each shared row: lanes' rows hit different banks
constexpr int kMinRowsAuto = 32;  // fewer rows per tile: the split-K kernel is the better fit

struct TileParams {
  const void* q;  // [B, Hq, Lq, D], rows 16-byte aligned
  const void* k;  // [B, Hkv, N, D], rows 16-byte aligned
  const void* v;  // [B, Hkv, N, D], rows 16-byte aligned
  Strides4 qs, ks, vs;
  LayoutView layout;
  const int32_t* idx;    // [B, Hs, Lq, K] contiguous
  const int32_t* q_pos;  // [B, Lq] or null
  AttentionShape shape;
  float score_scale;   // scale * log2(e): scores in base 2
  int positions;       // query positions per tile
  int heads;           // query heads per tile; positions * heads <= kTileRows
  int position_tiles;  // ceil(Lq / positions)
  int sort_size;       // power of two >= positions * topk
  void* out;           // [B, Hq, Lq, D] contiguous, dtype of q
  float* lse;          // [B, Hq, Lq]
};

// Byte offsets of a block's dynamic shared memory.
struct TileSmemLayout {
  int64_t q, k, v;   // uint16 [kTileRows][D + kRowPad] each (raw fp16/bf16)
  int64_t entries;   // uint64 [sort_size]: (position << 32 | region), sorted
  int64_t union_id;  // int32 [sort_size]: sorted regions, then the union's region ids
  int64_t union_begin;   // int32 [sort_size]: union region's first index into region_tokens
  int64_t union_offset;  // int32 [sort_size]: union region's first key in the union's key list
  int64_t weights;       // uint16 [positions][kTileKeys]: the step's multiplicities
  int64_t total;
};

GAZE_HD TileSmemLayout tile_smem_layout(int D, int sort_size, int positions) {
  TileSmemLayout s;
  const int64_t tile = int64_t(kTileRows) * (D + kRowPad) * 2;  // a multiple of 16 bytes
  s.q = 0;
  s.k = tile;
  s.v = 2 * tile;
  s.entries = 3 * tile;
  s.union_id = s.entries + 8 * int64_t(sort_size);
  s.union_begin = s.union_id + 4 * int64_t(sort_size);
  s.union_offset = s.union_begin + 4 * int64_t(sort_size);
  s.weights = s.union_offset + 4 * int64_t(sort_size);
  s.total = s.weights + 2 * int64_t(positions) * kTileKeys;
  return s;
}

// How many times `key` occurs in the ascending entries[0, n).
__device__ __forceinline__ int entry_count(const uint64_t* entries, int n, uint64_t key) {
  int lo = 0, hi = n;  // first entry >= key
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (entries[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  int count = 0;
  while (lo < n && entries[lo] == key) {
    ++count;
    ++lo;
  }
  return count;
}

__device__ __forceinline__ uint4 load_chunk(const uint16_t* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads) attention_forward_tiled_kernel(TileParams p) {
  constexpr int kStride = D + kRowPad;  // 16-bit elements per shared row
  constexpr int kWords = kStride / 2;   // 32-bit words per shared row
  constexpr int kChunks = D / 8;        // 16-byte chunks per row
  constexpr int kKeyBlocks = kTileKeys / 8;
  constexpr int kDimBlocks = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const TileSmemLayout L = tile_smem_layout(D, p.sort_size, p.positions);
  uint16_t* tile_q = reinterpret_cast<uint16_t*>(smem + L.q);
  uint16_t* tile_k = reinterpret_cast<uint16_t*>(smem + L.k);
  uint16_t* tile_v = reinterpret_cast<uint16_t*>(smem + L.v);
  uint64_t* entries = reinterpret_cast<uint64_t*>(smem + L.entries);
  int32_t* union_id = reinterpret_cast<int32_t*>(smem + L.union_id);
  int32_t* union_begin = reinterpret_cast<int32_t*>(smem + L.union_begin);
  int32_t* union_offset = reinterpret_cast<int32_t*>(smem + L.union_offset);
  uint16_t* weights = reinterpret_cast<uint16_t*>(smem + L.weights);
  __shared__ int32_t key_pos[kTileKeys];     // -1: no key
  __shared__ int32_t key_region[kTileKeys];  // -1: a fixed token
  __shared__ int32_t key_seen[kTileKeys];    // some row sees the key
  __shared__ int32_t limits[kTileRows];      // causal limit per position (-1: no query)
  __shared__ int32_t warp_totals[kTileWarps];

  const AttentionShape& S = p.shape;
  const LayoutView& layout = p.layout;
  const int G = S.group(), K = S.topk, Lq = S.q_len, tid = threadIdx.x;
  const int tile = int(blockIdx.x % p.position_tiles);
  const int hs = int((blockIdx.x / p.position_tiles) % S.sel_heads);
  const int64_t b = blockIdx.x / (int64_t(p.position_tiles) * S.sel_heads);
  const bool shared_sel = S.sel_heads == S.kv_heads;
  const int kv_head = shared_sel ? hs : hs / G;
  const int first_head = shared_sel ? hs * G : hs;
  const int i0 = tile * p.positions;
  const int positions = min(p.positions, Lq - i0);  // this tile's query positions
  const int rows = positions * p.heads;

  // The query rows (zero past `rows`) and the causal limits.
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p.q);
  for (int x = tid; x < kTileRows * kChunks; x += kTileThreads) {
    const int r = x / kChunks, c = x % kChunks;
    uint4 chunk = make_uint4(0, 0, 0, 0);
    if (r < rows) chunk = load_chunk(q + p.qs.offset(b, first_head + r % p.heads, i0 + r / p.heads) + c * 8);
    *reinterpret_cast<uint4*>(tile_q + r * kStride + c * 8) = chunk;
  }
  if (tid < kTileRows) {
    limits[tid] = tid >= positions ? -1 : p.q_pos ? p.q_pos[b * Lq + i0 + tid] : kNoCausalLimit;
  }

  // 1. Sorted (position, region) entries of the slots taken; absent ones sort last.
  const int32_t* tile_slots = p.idx + ((b * S.sel_heads + hs) * int64_t(Lq) + i0) * K;
  const int num_entries = positions * K;
  for (int e = tid; e < p.sort_size; e += kTileThreads) {
    uint64_t entry = ~0ull;
    if (e < num_entries) {
      const int32_t* slots = tile_slots + int64_t(e / K) * K;
      if (slot_taken(layout, slots, e % K)) entry = (uint64_t(e / K) << 32) | uint32_t(slots[e % K]);
    }
    entries[e] = entry;
  }
  __syncthreads();
  block_bitonic_sort</*kDescending=*/false>(entries, p.sort_size);

  // The union: the distinct regions of the entries, ascending.
  constexpr int32_t kNone = 0x7FFFFFFF;
  for (int e = tid; e < p.sort_size; e += kTileThreads) {
    union_id[e] = entries[e] == ~0ull ? kNone : int32_t(uint32_t(entries[e]));
  }
  __syncthreads();
  block_bitonic_sort</*kDescending=*/false>(union_id, p.sort_size);
  auto first_of_its_region = [&](int e) {
    return union_id[e] != kNone && (e == 0 || union_id[e] != union_id[e - 1]);
  };
  for (int e = tid; e < p.sort_size; e += kTileThreads) union_offset[e] = first_of_its_region(e);
  const int num_union = block_exclusive_scan(union_offset, p.sort_size, warp_totals);
  for (int e = tid; e < p.sort_size; e += kTileThreads) {
    if (first_of_its_region(e)) union_begin[union_offset[e]] = union_id[e];
  }
  __syncthreads();
  for (int u = tid; u < num_union; u += kTileThreads) {  // ids back to union_id, spans
    const int32_t region = union_begin[u];
    const RegionSpan span = layout.region(b, region);
    union_id[u] = region;
    union_begin[u] = span.begin;
    union_offset[u] = span.size();
  }
  const int union_keys = block_exclusive_scan(union_offset, num_union, warp_totals);

  // 2.-3. The keys, kTileKeys at a time.
  const int num_fixed = layout.num_fixed, num_keys = num_fixed + union_keys;
  const int32_t* fixed = layout.fixed(b);
  const int32_t* tokens = layout.tokens(b);
  const uint16_t* k = reinterpret_cast<const uint16_t*>(p.k) + p.ks.offset(b, kv_head, 0);
  const uint16_t* v = reinterpret_cast<const uint16_t*>(p.v) + p.vs.offset(b, kv_head, 0);
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const bool warp_active = warp * 16 < rows;
  const int row[2] = {warp * 16 + g, warp * 16 + g + 8};  // this thread's rows in the tile
  const int sel[2] = {row[0] < rows ? row[0] / p.heads : -1, row[1] < rows ? row[1] / p.heads : -1};
  float acc[kDimBlocks][4] = {};  // O, unnormalized: rows row[0] (acc[][0..1]) and row[1] ([2..3])
  float row_max[2] = {kNegInf, kNegInf};
  float row_sum[2] = {0.f, 0.f};  // this thread's columns only; the quad's lanes add up at the end

  for (int k0 = 0; k0 < num_keys; k0 += kTileKeys) {
    // a. positions (and regions) of the step's keys
    if (tid < kTileKeys) {
      const int e = k0 + tid;
      int32_t pos = -1, region = -1;
      if (e < num_fixed) {
        pos = fixed[e];
      } else if (e < num_keys) {
        const int w = e - num_fixed;
        int lo = 0, hi = num_union - 1;  // the last union region whose first key is <= w
        while (lo < hi) {
          const int mid = (lo + hi + 1) / 2;
          if (union_offset[mid] <= w) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        pos = tokens[union_begin[lo] + (w - union_offset[lo])];
        region = union_id[lo];
      }
      key_pos[tid] = layout.visible(pos, kNoCausalLimit) ? pos : -1;
      key_region[tid] = region;
      key_seen[tid] = 0;
    }
    __syncthreads();

    // b. multiplicities
    int seen = 0;
    for (int x = tid; x < p.positions * kTileKeys; x += kTileThreads) {
      const int position = x / kTileKeys, j = x % kTileKeys;
      const int32_t pos = key_pos[j];
      int count = 0;
      if (pos >= 0 && pos <= limits[position]) {
        count = key_region[j] < 0
                    ? 1
                    : entry_count(entries, p.sort_size,
                                  (uint64_t(position) << 32) | uint32_t(key_region[j]));
      }
      weights[x] = uint16_t(count);
      if (count > 0) {
        key_seen[j] = 1;
        seen = 1;
      }
    }
    if (!__syncthreads_or(seen)) continue;

    // c. gather the K and V rows (zeros for keys no row sees)
    for (int x = tid; x < kTileKeys * kChunks; x += kTileThreads) {
      const int j = x / kChunks, c = x % kChunks;
      uint4 kchunk = make_uint4(0, 0, 0, 0), vchunk = kchunk;
      if (key_seen[j]) {
        const int64_t pos = key_pos[j];
        kchunk = load_chunk(k + pos * p.ks.row + c * 8);
        vchunk = load_chunk(v + pos * p.vs.row + c * 8);
      }
      *reinterpret_cast<uint4*>(tile_k + j * kStride + c * 8) = kchunk;
      *reinterpret_cast<uint4*>(tile_v + j * kStride + c * 8) = vchunk;
    }
    __syncthreads();

    if (warp_active) {
      // d. S = Q K^T for the warp's 16 rows and the step's keys
      float s[kKeyBlocks][4] = {};
      const uint32_t* q32 = reinterpret_cast<const uint32_t*>(tile_q);
      const uint32_t* k32 = reinterpret_cast<const uint32_t*>(tile_k);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t a[4] = {q32[row[0] * kWords + kk * 8 + t4], q32[row[1] * kWords + kk * 8 + t4],
                               q32[row[0] * kWords + kk * 8 + 4 + t4],
                               q32[row[1] * kWords + kk * 8 + 4 + t4]};
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) {
          const int key_word = (nb * 8 + g) * kWords + kk * 8 + t4;
          const uint32_t bk[2] = {k32[key_word], k32[key_word + 4]};
          mma_16x8x16<T>(s[nb], a, bk);
        }
      }

      // e. multiplicities and the online softmax, per row (h: row[h], elements 2h, 2h+1)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint16_t* w = weights + max(sel[h], 0) * kTileKeys;
        float step_max = kNegInf;
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const bool on = sel[h] >= 0 && w[nb * 8 + 2 * t4 + c] > 0;
            const float x = on ? s[nb][2 * h + c] * p.score_scale : kNegInf;
            s[nb][2 * h + c] = x;
            step_max = fmaxf(step_max, x);
          }
        }
        step_max = fmaxf(step_max, __shfl_xor_sync(0xFFFFFFFFu, step_max, 1));
        step_max = fmaxf(step_max, __shfl_xor_sync(0xFFFFFFFFu, step_max, 2));
        const float new_max = fmaxf(row_max[h], step_max);
        const float safe = softmax_safe_max(new_max);
        const float rescale = softmax_rescale(row_max[h], new_max);
        row_max[h] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int count = sel[h] >= 0 ? w[nb * 8 + 2 * t4 + c] : 0;
            const float pj = count > 0 ? float(count) * exp2_approx(s[nb][2 * h + c] - safe) : 0.f;
            s[nb][2 * h + c] = pj;
            sum += pj;
          }
        }
        row_sum[h] = row_sum[h] * rescale + sum;
#pragma unroll
        for (int dn = 0; dn < kDimBlocks; ++dn) {
          acc[dn][2 * h] *= rescale;
          acc[dn][2 * h + 1] *= rescale;
        }
      }

      // f. O += P V: the C fragments of key blocks 2ks, 2ks+1 are P's A fragment
#pragma unroll
      for (int ks = 0; ks < kTileKeys / 16; ++ks) {
        const uint32_t a[4] = {pack_pair<T>(s[2 * ks][0], s[2 * ks][1]),
                               pack_pair<T>(s[2 * ks][2], s[2 * ks][3]),
                               pack_pair<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                               pack_pair<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
        const uint16_t* v0 = tile_v + (ks * 16 + 2 * t4) * kStride + g;  // key 2t4, column g
#pragma unroll
        for (int dn = 0; dn < kDimBlocks; ++dn) {
          const uint16_t* vc = v0 + dn * 8;
          const uint32_t bv[2] = {pack_raw_pair(vc[0], vc[kStride]),
                                  pack_raw_pair(vc[8 * kStride], vc[9 * kStride])};
          mma_16x8x16<T>(acc[dn], a, bv);
        }
      }
    }
    __syncthreads();
  }

  // out and lse
  if (warp_active) {
    T* out = reinterpret_cast<T*>(p.out);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[h];
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
      if (row[h] >= rows) continue;
      const int head = first_head + row[h] % p.heads, i = i0 + row[h] / p.heads;
      const int64_t out_row = (b * S.q_heads + head) * int64_t(Lq) + i;
      const float norm = softmax_normalizer(sum);
      uint32_t* dst = reinterpret_cast<uint32_t*>(out + out_row * D);
#pragma unroll
      for (int dn = 0; dn < kDimBlocks; ++dn) {
        dst[dn * 4 + t4] = pack_pair<T>(acc[dn][2 * h] * norm, acc[dn][2 * h + 1] * norm);
      }
      if (t4 == 0) p.lse[out_row] = softmax_lse(row_max[h], sum);
    }
  }
}

enum class ForwardKernel { kAuto, kTensorCore, kSplit };

// GAZE_ATTENTION_KERNEL=auto (default) | tensor_core | split: which forward runs
// when both apply (the tests run each).
ForwardKernel forward_kernel_choice() {
  const char* env = std::getenv("GAZE_ATTENTION_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return ForwardKernel::kAuto;
  if (std::strcmp(env, "tensor_core") == 0) return ForwardKernel::kTensorCore;
  if (std::strcmp(env, "split") == 0) return ForwardKernel::kSplit;
  TORCH_CHECK(false, "GAZE_ATTENTION_KERNEL must be auto, tensor_core or split, not '", env, "'");
}

int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

template <typename T, int D>
bool launch_tiled(TileParams& p, cudaStream_t stream) {
  auto kernel = attention_forward_tiled_kernel<T, D>;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (major < 8 || attributes.binaryVersion < 80) return false;  // no bf16/fp16 mma.sync
  const int64_t shared = tile_smem_layout(D, p.sort_size, p.positions).total;
  int shared_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (shared + int64_t(attributes.sharedSizeBytes) > shared_limit) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  const int64_t blocks = int64_t(p.shape.batch) * p.shape.sel_heads * p.position_tiles;
  kernel<<<dim3(unsigned(blocks)), dim3(kTileThreads), shared, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

bool run_tiled_forward(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse) {
  const ForwardKernel choice = forward_kernel_choice();
  if (choice == ForwardKernel::kSplit) return false;
  const AttentionShape& S = a.shape;
  const at::ScalarType dtype = a.q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (S.head_dim != 64 && S.head_dim != 128) return false;
  const int heads = S.sel_heads == S.kv_heads ? S.group() : 1;
  if (heads > kTileRows || S.topk > kMaxEntries) return false;
  const int positions = std::min({kTileRows / heads, kMaxEntries / S.topk, S.q_len});
  if (choice == ForwardKernel::kAuto && positions * heads < kMinRowsAuto) return false;
  const auto aligned = [&](const at::Tensor& t) {  // every row 16-byte aligned
    return rows_vectorizable<c10::Half>(t.data_ptr(), S.head_dim, {t.stride(0), t.stride(1), t.stride(2)});
  };
  if (!aligned(a.q) || !aligned(a.k) || !aligned(a.v)) return false;

  TileParams p{};
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  p.qs = strides_of(a.q);
  p.ks = strides_of(a.k);
  p.vs = strides_of(a.v);
  p.layout = a.layout.view(a.num_keys);
  p.idx = a.idx.data_ptr<int32_t>();
  p.q_pos = a.q_pos.defined() ? a.q_pos.data_ptr<int32_t>() : nullptr;
  p.shape = S;
  p.score_scale = static_cast<float>(a.scale) * kLog2e;
  p.positions = positions;
  p.heads = heads;
  p.position_tiles = int(ceil_div(S.q_len, positions));
  p.sort_size = next_pow2(positions * S.topk);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = dtype == at::kBFloat16;
  if (S.head_dim == 64) {
    return bf16 ? launch_tiled<__nv_bfloat16, 64>(p, stream) : launch_tiled<__half, 64>(p, stream);
  }
  return bf16 ? launch_tiled<__nv_bfloat16, 128>(p, stream) : launch_tiled<__half, 128>(p, stream);
}

}  // namespace gaze::cuda
