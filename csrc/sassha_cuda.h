// The interface between the CUDA kernels (sassha_cuda_kernels.cu, plain CUDA,
// compiled by nvcc without torch headers) and their torch binding
// (sassha_cuda.cpp). Host code fills these tables, copies them to the device,
// and calls a launcher; each CUDA block finds its (tensor, chunk) in ``blocks``.
#pragma once

#include <cstdint>

namespace sassha {
namespace cuda {

// Elements one CUDA block handles: 256 threads x 4 elements x 4 iterations.
// A multiple of the 32-element probe word.
constexpr int64_t kBlockElems = 4096;
constexpr int kThreads = 256;
// Elements per vectorised load (16 bytes of fp32, 8 bytes of bf16/fp16).
constexpr int kVec = 4;

enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Per-tensor scalar fields of TensorRec::scalars (doubles, cast in the kernel).
enum Scalar : int32_t {
  kBeta1 = 0, kBeta2, kLr, kWeightDecay, kEps, kPower, kBiasCorrection1, kBiasCorrection2, kNumScalars
};

// One tensor of a launch. Unused pointers are null.
struct TensorRec {
  void* param;           // x (param dtype); the probe output for probes
  const void* source;    // perturb/sq_norm: direction v; update: gradient g~
  void* backup;          // perturb: written with x; update: x_t is read from it (may alias param)
  float* exp_avg;        // m (fp32)
  float* exp_hessian_diag;  // D (fp32)
  int64_t numel;         // elements
  int64_t hz_index;      // update: first of n_samples entries in the hz / keys tables
  int32_t dtype;         // DType of param / backup / gradient / Hz
  int32_t source_fp32;   // 1 when ``source`` is fp32 (M-SASSHA's exp_avg), else param dtype
  int32_t aligned;       // 1 when every pointer is 16-byte aligned: vector loads allowed
  uint32_t k0, k1;       // probes: the stream key of this tensor
  double scalars[kNumScalars];  // update: hyper-parameters; perturb: [0] sign*rho, [1] perturb_eps
};

// One CUDA block: which tensor, which kBlockElems-sized chunk of it.
struct BlockRec {
  int32_t tensor;
  int32_t chunk;
};

// All pointers below are device pointers; ``stream`` is a cudaStream_t.
// Sum of ||w v||^2 into *out (float, or double when acc64); partials holds
// n_blocks accumulators of the same type (no atomics: the result is deterministic).
void launch_sq_norm(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, bool adaptive,
                    bool acc64, void* partials, void* out, void* stream);
// backup = x; x += scale * v [* x^2]; scale from *sq_norm (float, or double when norm64).
void launch_perturb(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, const void* sq_norm,
                    bool norm64, bool adaptive, void* stream);
// param = z, the Rademacher probe of the key (k0, k1).
void launch_probes(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, void* stream);
// The SASSHA update. On refresh steps hz[hz_index + s] is H z_s (null: Hz = 0) and
// keys[2 (hz_index + s) + {0, 1}] the key of z_s. sqrt_power: every tensor has p = 0.5
// (else each tensor takes sqrt or pow by its own p, as the CPU kernels do).
void launch_update(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, const void* const* hz,
                   const uint32_t* keys, int64_t n_samples, bool refresh, bool sqrt_power, void* stream);

}  // namespace cuda
}  // namespace sassha
