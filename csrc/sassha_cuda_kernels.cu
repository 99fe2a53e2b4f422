// CUDA kernels of SASSHA's four phases, multi-tensor: one launch per phase covers
// every tensor of a (device, call); block b works on chunk blocks[b].chunk of
// tensor blocks[b].tensor. Plain CUDA, no torch headers (see sassha_cuda.h);
// the per-element math is sassha_math.h, shared with the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sassha_cuda.h"
#include "sassha_math.h"

namespace sassha {
namespace cuda {
namespace {

// Every thread starts its kVec elements at a multiple of kVec, so they never span
// two 32-element probe words (the probe kernels hash once per kVec elements).
static_assert(kBlockElems % kVec == 0 && kProbeWordBits % kVec == 0, "kVec must divide the probe word");

// ---- loads and stores in the param dtype, math in fp32 -----------------------
template <typename T> struct Conv;
template <> struct Conv<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Conv<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// kVec elements starting at i: one vector load when allowed, else guarded scalars.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, int64_t end, bool vec, float (&out)[kVec]) {
  if (vec && i + kVec <= end) {
    const Vec<T> w = *reinterpret_cast<const Vec<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = Conv<T>::load(w.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = i + k < end ? Conv<T>::load(p[i + k]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, int64_t end, bool vec, const float (&in)[kVec]) {
  if (vec && i + kVec <= end) {
    Vec<T> w;
#pragma unroll
    for (int k = 0; k < kVec; ++k) w.v[k] = Conv<T>::store(in[k]);
    *reinterpret_cast<Vec<T>*>(p + i) = w;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (i + k < end) p[i + k] = Conv<T>::store(in[k]);
  }
}

// Raw copy of kVec param-dtype elements (the backup is a bitwise copy of x).
template <typename T>
__device__ __forceinline__ void copy_vec(T* dst, const T* src, int64_t i, int64_t end, bool vec) {
  if (vec && i + kVec <= end) {
    *reinterpret_cast<Vec<T>*>(dst + i) = *reinterpret_cast<const Vec<T>*>(src + i);
  } else {
    for (int k = 0; k < kVec; ++k)
      if (i + k < end) dst[i + k] = src[i + k];
  }
}

// The element range of this block: [begin, end), stepping kThreads * kVec.
struct Range {
  int64_t begin, end;
};
__device__ __forceinline__ Range block_range(const TensorRec& r, const BlockRec& b) {
  const int64_t begin = static_cast<int64_t>(b.chunk) * kBlockElems;
  const int64_t end = begin + kBlockElems < r.numel ? begin + kBlockElems : r.numel;
  return {begin, end};
}

template <typename F>
__device__ __forceinline__ void dispatch_dtype(int32_t dtype, const F& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    case kFloat16: f(__half{}); break;
    default: break;  // rejected on the host
  }
}

// ---- phase 1: squared norm ------------------------------------------------------
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A shared[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename A, bool ADAPTIVE>
__global__ void __launch_bounds__(kThreads) sq_norm_kernel(const TensorRec* __restrict__ recs,
                                                           const BlockRec* __restrict__ blocks,
                                                           A* __restrict__ partials) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec& r = recs[b.tensor];
  const Range range = block_range(r, b);
  A acc = 0;
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float v[kVec], x[kVec] = {};
      if (r.source_fp32) load_vec(static_cast<const float*>(r.source), i, range.end, r.aligned, v);
      else load_vec(static_cast<const T*>(r.source), i, range.end, r.aligned, v);
      if (ADAPTIVE) load_vec(static_cast<const T*>(r.param), i, range.end, r.aligned, x);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc += sq_norm_term<A, ADAPTIVE>(A(v[k]), A(x[k]));
    }
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Adds the partials in a fixed order: the norm does not depend on scheduling.
template <typename A>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const A* __restrict__ partials, int64_t n,
                                                                A* __restrict__ out) {
  A acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = acc;
}

// ---- phase 2: perturbation --------------------------------------------------------
template <typename A, bool ADAPTIVE>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const TensorRec* __restrict__ recs,
                                                           const BlockRec* __restrict__ blocks,
                                                           const A* __restrict__ sq_norm) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec& r = recs[b.tensor];
  const Range range = block_range(r, b);
  // Read from the device: the host never waits for the norm.
  const float scale = static_cast<float>(perturb_scale<A>(*sq_norm, r.scalars[0], r.scalars[1]));
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* x = static_cast<T*>(r.param);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float x0[kVec], v[kVec], out[kVec];
      load_vec(static_cast<const T*>(x), i, range.end, r.aligned, x0);
      if (r.source_fp32) load_vec(static_cast<const float*>(r.source), i, range.end, r.aligned, v);
      else load_vec(static_cast<const T*>(r.source), i, range.end, r.aligned, v);
      copy_vec(static_cast<T*>(r.backup), static_cast<const T*>(x), i, range.end, r.aligned);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = perturb_value<float, ADAPTIVE>(x0[k], v[k], scale);
      store_vec(x, i, range.end, r.aligned, out);
    }
  });
}

// ---- phase 3: probes -----------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) probes_kernel(const TensorRec* __restrict__ recs,
                                                          const BlockRec* __restrict__ blocks) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec& r = recs[b.tensor];
  const Range range = block_range(r, b);
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      // One hash per kVec elements: i is a multiple of kVec, so they share a probe word.
      const uint32_t bits = probe_bits(static_cast<uint32_t>(i >> 5), r.k0, r.k1);
      float z[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) z[k] = probe_sign<float>(bits, static_cast<uint32_t>(i & 31) + k);
      store_vec(static_cast<T*>(r.param), i, range.end, r.aligned, z);
    }
  });
}

// ---- phase 4: update -------------------------------------------------------------------
__device__ __forceinline__ UpdateScalars<float> update_scalars(const TensorRec& r, int64_t n_samples) {
  const double* s = r.scalars;
  UpdateScalars<float> u;
  u.beta1 = static_cast<float>(s[kBeta1]);
  u.one_minus_beta1 = static_cast<float>(1.0 - s[kBeta1]);
  u.beta2 = static_cast<float>(s[kBeta2]);
  u.one_minus_beta2 = static_cast<float>(1.0 - s[kBeta2]);
  u.decay = static_cast<float>(1.0 - s[kLr] * s[kWeightDecay]);
  u.neg_step_size = static_cast<float>(-(s[kLr] / s[kBiasCorrection1]));
  u.inv_bias_correction2 = static_cast<float>(1.0 / s[kBiasCorrection2]);
  u.eps = static_cast<float>(s[kEps]);
  u.power = static_cast<float>(s[kPower]);
  u.n_samples = static_cast<float>(n_samples);
  return u;
}

template <bool REFRESH, bool SQRT_POWER>
__global__ void __launch_bounds__(kThreads) update_kernel(const TensorRec* __restrict__ recs,
                                                          const BlockRec* __restrict__ blocks,
                                                          const void* const* __restrict__ hz,
                                                          const uint32_t* __restrict__ keys,
                                                          int64_t n_samples) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec& r = recs[b.tensor];
  const Range range = block_range(r, b);
  const UpdateScalars<float> s = update_scalars(r, n_samples);
  // D^p as the CPU kernels take it: sqrt for each tensor whose p is 0.5, pow otherwise
  // (SQRT_POWER: every tensor of the launch has p = 0.5).
  const bool sqrt_power = SQRT_POWER || r.scalars[kPower] == 0.5;
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float x[kVec], g[kVec], m[kVec], d[kVec];
      load_vec(static_cast<const T*>(r.backup), i, range.end, r.aligned, x);
      load_vec(static_cast<const T*>(r.source), i, range.end, r.aligned, g);
      load_vec(static_cast<const float*>(r.exp_avg), i, range.end, r.aligned, m);
      load_vec(static_cast<const float*>(r.exp_hessian_diag), i, range.end, r.aligned, d);
      if (REFRESH) {
        float h[kVec] = {};
        for (int64_t smp = 0; smp < n_samples; ++smp) {
          const T* hs = static_cast<const T*>(hz[r.hz_index + smp]);
          if (hs == nullptr) continue;  // param absent from the graph: Hz = 0
          const uint32_t k0 = keys[2 * (r.hz_index + smp)], k1 = keys[2 * (r.hz_index + smp) + 1];
          const uint32_t bits = probe_bits(static_cast<uint32_t>(i >> 5), k0, k1);  // one word for i .. i + kVec - 1
          float hv[kVec];
          load_vec(hs, i, range.end, r.aligned, hv);
#pragma unroll
          for (int k = 0; k < kVec; ++k) h[k] += probe_sign<float>(bits, static_cast<uint32_t>(i & 31) + k) * hv[k];
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) d[k] = hessian_ema<float>(d[k], h[k], s);
      }
      float out[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        out[k] = sqrt_power ? sassha_update<float, true>(x[k], m[k], d[k], g[k], s)
                            : sassha_update<float, false>(x[k], m[k], d[k], g[k], s);
      store_vec(static_cast<T*>(r.param), i, range.end, r.aligned, out);
      store_vec(r.exp_avg, i, range.end, r.aligned, m);
      if (REFRESH) store_vec(r.exp_hessian_diag, i, range.end, r.aligned, d);
    }
  });
}

}  // namespace

// ---- launchers --------------------------------------------------------------------------
void launch_sq_norm(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, bool adaptive, bool acc64,
                    void* partials, void* out, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (acc64) {
    if (adaptive) sq_norm_kernel<double, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<double*>(partials));
    else sq_norm_kernel<double, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<double*>(partials));
    sum_partials_kernel<double><<<1, kThreads, 0, st>>>(static_cast<const double*>(partials), n_blocks, static_cast<double*>(out));
  } else {
    if (adaptive) sq_norm_kernel<float, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<float*>(partials));
    else sq_norm_kernel<float, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<float*>(partials));
    sum_partials_kernel<float><<<1, kThreads, 0, st>>>(static_cast<const float*>(partials), n_blocks, static_cast<float*>(out));
  }
}

void launch_perturb(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, const void* sq_norm, bool norm64,
                    bool adaptive, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (norm64) {
    const auto* n = static_cast<const double*>(sq_norm);
    if (adaptive) perturb_kernel<double, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n);
    else perturb_kernel<double, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n);
  } else {
    const auto* n = static_cast<const float*>(sq_norm);
    if (adaptive) perturb_kernel<float, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n);
    else perturb_kernel<float, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n);
  }
}

void launch_probes(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, void* stream) {
  probes_kernel<<<n_blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(recs, blocks);
}

void launch_update(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, const void* const* hz,
                   const uint32_t* keys, int64_t n_samples, bool refresh, bool sqrt_power, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (refresh) {
    if (sqrt_power) update_kernel<true, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, hz, keys, n_samples);
    else update_kernel<true, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, hz, keys, n_samples);
  } else {
    if (sqrt_power) update_kernel<false, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, hz, keys, n_samples);
    else update_kernel<false, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, hz, keys, n_samples);
  }
}

}  // namespace cuda
}  // namespace sassha
