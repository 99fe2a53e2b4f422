// The interface between the CUDA kernels (sassha_cuda_kernels.cu, plain CUDA,
// compiled by nvcc without torch headers) and their torch binding
// (sassha_cuda.cpp). The binding builds a table of TensorRecs and a block map per
// call, reuses the device copy of both while the tensors' storage is unchanged,
// and calls a launcher; each CUDA block finds its (tensor, chunk) in ``blocks``
// and copies its TensorRec into registers (by value: reading fields through a
// reference into global memory kept the compiler from vectorising the stores).
#pragma once

#include <cstdint>

namespace sassha {
namespace cuda {

// Elements one CUDA block handles: 256 threads x 8 elements x 2 iterations.
// A multiple of the 32-element probe word.
constexpr int64_t kBlockElems = 4096;
constexpr int kThreads = 256;
// Elements per thread and iteration: 16-byte accesses for every dtype (one of
// bf16/fp16, two of fp32).
constexpr int kVec = 8;

// The final sum of a norm's per-block partials runs in rounds: each block of a round
// adds kReduceChunk consecutive values in a fixed order (deterministic), until one is
// left. 875M params (213k partials) take rounds of 53 blocks and 1.
constexpr int64_t kReduceChunk = 4096;
inline int64_t reduce_blocks(int64_t n) { return n <= kReduceChunk ? 1 : (n + kReduceChunk - 1) / kReduceChunk; }
// Accumulators a norm over n_blocks tiles needs: the partials and every round's
// outputs but the last (which goes to the result).
inline int64_t norm_scratch_elems(int64_t n_blocks) {
  int64_t total = n_blocks;
  for (int64_t n = n_blocks; reduce_blocks(n) > 1; n = reduce_blocks(n)) total += reduce_blocks(n);
  return total;
}

enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One tensor of a launch; the meaning of the pointers depends on the op. Unused
// pointers are null.
//   sq_norm: x = params (read if adaptive), src = v
//   perturb: x = params, src = v, aux = backup (written)
//   probes:  x = z (written)
//   fd_move: x = params, src = base (x itself when moving in place), aux = save
//   fd_fold: x = acc, src = this pass's gradient, aux = baseline
//   update:  x = params, src = g~, aux = x_t (may alias x), m, d = state in the
//            launch's state_bits encoding (32: float32; 16: bfloat16; 8: int8 / uint8
//            codes with float32 group scales m_scale, d_scale), corr = the int8 (24) /
//            int16 (32) master correction of a bfloat16 param (master_bits), else null
// The probe ops (probes, fd_move, fd_fold, update) draw local element i's probe at
// global element element_offset + i (a shard of a larger tensor, FSDP2; else 0).
struct TensorRec {
  void* x;
  const void* src;
  void* aux;
  void* m;
  void* d;
  float* m_scale;  // state_bits 8: one float32 scale per group of 32 elements
  float* d_scale;
  void* corr;      // master correction (update, master_bits != 0)
  int64_t numel;
  int64_t element_offset;  // global probe element of the tensor's first element
  int32_t dtype;       // DType of x, src, aux (src may be fp32 when src_fp32)
  int32_t src_fp32;    // 1 when ``src`` is fp32 while x is 16-bit (M-SASSHA's exp_avg)
  int32_t aligned;     // 1 when every vector-accessed pointer is 16-byte aligned: vector loads allowed
  uint32_t param_index;  // the probes' counter
  int32_t group;       // row of the group table
  int32_t master_bits;  // 0, or 24 / 32: corr holds the low bits of a bfloat16 param's master weight
};
// The host (sassha_cuda.cpp, a C++ compiler) and the kernels (nvcc) must agree on it,
// and the table cache keys on its bytes: no implicit padding.
static_assert(sizeof(TensorRec) == 8 * sizeof(void*) + 2 * sizeof(int64_t) + 6 * sizeof(int32_t),
              "TensorRec has padding");

// One CUDA block: which tensor, which kBlockElems-sized chunk of it.
struct BlockRec {
  int32_t tensor;
  int32_t chunk;
};

// All pointers below are device pointers; ``stream`` is a cudaStream_t.
// Sum of ||w v||^2 into *out (float, or double when acc64); partials holds
// norm_scratch_elems(n_blocks) accumulators of the same type (no atomics: the
// result is deterministic).
void launch_sq_norm(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, bool adaptive, bool acc64,
                    void* partials, void* out, void* stream);
// aux = x; x += scale * src [* x^2]; scale from *sq_norm (float, or double when
// norm64) and the tensor's group row of ``groups`` (float64, GroupCol).
void launch_perturb(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, const void* sq_norm,
                    bool norm64, const double* groups, double sign, bool adaptive, void* stream);
// x = z, the Rademacher probe of the tensor's param_index under ``prefix`` (from
// its element_offset).
void launch_probes(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, uint32_t prefix, void* stream);
// aux = x (if save); x = src + sign * (*delta) * z.
void launch_fd_move(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, uint32_t prefix,
                    const float* delta, float sign, bool save, void* stream);
// x = (first ? 0 : x) + (src - aux) * z * coefficient / (*delta)  (aux null: no baseline)
void launch_fd_fold(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, uint32_t prefix,
                    const float* delta, float coefficient, bool first, void* stream);
// The SASSHA update. ``scalars`` is the float64 [n, UpdateCol] table; on refresh
// steps ys[s * n_tensors + j] is the refresh input of sample s (null: 0) and
// prefixes[s] the key prefix of its probe vector (refresh_mode: RefreshMode);
// fd = [delta, h_floor] in the finite-difference modes. ``state_bits`` (32, 16, 8):
// the encoding of every record's m and d (sassha_math.h, encoding.py).
void launch_update(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, int64_t n_tensors,
                   const double* scalars, double power, int refresh_mode, const void* const* ys,
                   const uint32_t* prefixes, int64_t n_samples, const float* fd, int state_bits, void* stream);

}  // namespace cuda
}  // namespace sassha
