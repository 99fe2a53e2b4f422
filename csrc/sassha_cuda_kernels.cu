// CUDA kernels of SASSHA's four phases, multi-tensor: one launch per phase covers
// every tensor of a (device, call); block b works on chunk blocks[b].chunk of
// tensor blocks[b].tensor. Plain CUDA, no torch headers (see sassha_cuda.h);
// the per-element math is sassha_math.h, shared with the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "sassha_cuda.h"
#include "sassha_math.h"

namespace sassha {
namespace cuda {
namespace {

// Every thread starts its kVec elements at a multiple of kVec, so they never span
// two 32-element probe words when the tensor's element_offset is a multiple of kVec
// (one hash per kVec elements); otherwise a thread's run may cross a word, and
// probe_bits_at takes a second hash for it.
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

// ---- 16-byte global accesses ------------------------------------------------------
// The data pointers come from the records in global memory, not from kernel
// parameters, so the compiler sees generic pointers and emits generic ld/st (and,
// for 16-bit data, 8-byte vectors of kVec = 4). Explicit ld/st.global.v4 make every
// vector access 16 bytes whatever the element type: kVec elements are
// kVec * sizeof(T) / 16 such words (2 of fp32, 1 of bf16/fp16).
// tests/test_cuda_sources.py checks the PTX for them.
__device__ __forceinline__ uint4 ld_global16(const void* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ void st_global16(void* p, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Elements of T in one 32-bit lane of a 16-byte word, and their bits.
template <typename T> struct Lane;
template <> struct Lane<float> {
  static constexpr int kPer = 1;
  static __device__ __forceinline__ float get(uint32_t w, int) { return __uint_as_float(w); }
  static __device__ __forceinline__ uint32_t bits(float v) { return __float_as_uint(v); }
};
template <> struct Lane<__nv_bfloat16> {
  static constexpr int kPer = 2;
  static __device__ __forceinline__ float get(uint32_t w, int k) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> (16 * k))));
  }
  static __device__ __forceinline__ uint32_t bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
template <> struct Lane<__half> {
  static constexpr int kPer = 2;
  static __device__ __forceinline__ float get(uint32_t w, int k) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> (16 * k))));
  }
  static __device__ __forceinline__ uint32_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <typename T>
constexpr int kPerWord = 16 / static_cast<int>(sizeof(T));  // elements of T in 16 bytes
static_assert(kVec % kPerWord<__nv_bfloat16> == 0, "kVec must fill whole 16-byte words of 16-bit data");

__device__ __forceinline__ uint32_t lane(const uint4& u, int l) { return l == 0 ? u.x : l == 1 ? u.y : l == 2 ? u.z : u.w; }

// kVec elements starting at i: 16-byte loads when allowed, else guarded scalars.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, int64_t end, bool vec, float (&out)[kVec]) {
  if (vec && i + kVec <= end) {
#pragma unroll
    for (int c = 0; c < kVec / kPerWord<T>; ++c) {
      const uint4 u = ld_global16(p + i + c * kPerWord<T>);
#pragma unroll
      for (int k = 0; k < kPerWord<T>; ++k)
        out[c * kPerWord<T> + k] = Lane<T>::get(lane(u, k / Lane<T>::kPer), k % Lane<T>::kPer);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = i + k < end ? Conv<T>::load(p[i + k]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, int64_t end, bool vec, const float (&in)[kVec]) {
  if (vec && i + kVec <= end) {
#pragma unroll
    for (int c = 0; c < kVec / kPerWord<T>; ++c) {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int k = 0; k < kPerWord<T>; ++k)
        w[k / Lane<T>::kPer] |= Lane<T>::bits(in[c * kPerWord<T> + k]) << (32 / Lane<T>::kPer * (k % Lane<T>::kPer));
      st_global16(p + i + c * kPerWord<T>, make_uint4(w[0], w[1], w[2], w[3]));
    }
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
#pragma unroll
    for (int c = 0; c < kVec / kPerWord<T>; ++c)
      st_global16(dst + i + c * kPerWord<T>, ld_global16(src + i + c * kPerWord<T>));
  } else {
    for (int k = 0; k < kVec; ++k)
      if (i + k < end) dst[i + k] = src[i + k];
  }
}

// The element range of this block: [begin, end), stepping kThreads * kVec.
struct Range {
  int64_t begin, end;
};
__device__ __forceinline__ Range block_range(const TensorRec r, const BlockRec b) {
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

// ---- squared norm ---------------------------------------------------------------
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
  const TensorRec r = recs[b.tensor];
  const Range range = block_range(r, b);
  A acc = 0;
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float v[kVec], x[kVec] = {};
      if (r.src_fp32) load_vec(static_cast<const float*>(r.src), i, range.end, r.aligned, v);
      else load_vec(static_cast<const T*>(r.src), i, range.end, r.aligned, v);
      if (ADAPTIVE) load_vec(static_cast<const T*>(r.x), i, range.end, r.aligned, x);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc += sq_norm_term<A, ADAPTIVE>(A(v[k]), A(x[k]));
    }
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One round of the final sum: block b adds partials [b * kReduceChunk, (b + 1) * kReduceChunk)
// in a fixed order into out[b]. Rounds repeat until one sum is left (launch_sq_norm):
// many blocks share the work, and the norm does not depend on scheduling.
template <typename A>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const A* __restrict__ partials, int64_t n,
                                                                A* __restrict__ out) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kReduceChunk;
  const int64_t last = first + kReduceChunk < n ? first + kReduceChunk : n;
  A acc = 0;
  for (int64_t i = first + threadIdx.x; i < last; i += kThreads) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

// Rounds of sum_partials_kernel from n partials down to *out; later rounds' inputs
// follow the partials in the same buffer (norm_scratch_elems sizes it).
template <typename A>
void sum_partials(A* partials, int64_t n, A* out, cudaStream_t st) {
  while (true) {
    const int64_t blocks = reduce_blocks(n);
    A* dst = blocks == 1 ? out : partials + n;
    sum_partials_kernel<A><<<blocks, kThreads, 0, st>>>(partials, n, dst);
    if (blocks == 1) return;
    partials += n;
    n = blocks;
  }
}

// ---- perturbation ----------------------------------------------------------------
template <typename A, bool ADAPTIVE>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const TensorRec* __restrict__ recs,
                                                           const BlockRec* __restrict__ blocks,
                                                           const A* __restrict__ sq_norm,
                                                           const double* __restrict__ groups, double sign) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec r = recs[b.tensor];
  const Range range = block_range(r, b);
  const double* row = groups + r.group * GroupCol::kCount;
  // Read from the device: the host never waits for the norm.
  const float scale = static_cast<float>(perturb_scale<A>(*sq_norm, sign * row[GroupCol::kRho], row[GroupCol::kPerturbEps]));
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* x = static_cast<T*>(r.x);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float x0[kVec], v[kVec], out[kVec];
      load_vec(static_cast<const T*>(x), i, range.end, r.aligned, x0);
      if (r.src_fp32) load_vec(static_cast<const float*>(r.src), i, range.end, r.aligned, v);
      else load_vec(static_cast<const T*>(r.src), i, range.end, r.aligned, v);
      copy_vec(static_cast<T*>(r.aux), static_cast<const T*>(x), i, range.end, r.aligned);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = perturb_value<float, ADAPTIVE>(x0[k], v[k], scale);
      store_vec(x, i, range.end, r.aligned, out);
    }
  });
}

// ---- probes ------------------------------------------------------------------------
// z of the kVec elements at global probe element e = element_offset + i (int64):
// one hash, two when the run crosses a probe word (an offset not a multiple of kVec).
__device__ __forceinline__ void probe_vec(int64_t e, ProbeKey key, float (&z)[kVec]) {
  const uint32_t bits = probe_bits_at(e, key, kVec);
#pragma unroll
  for (int k = 0; k < kVec; ++k) z[k] = probe_sign<float>(bits, static_cast<uint32_t>(k));
}

__global__ void __launch_bounds__(kThreads) probes_kernel(const TensorRec* __restrict__ recs,
                                                          const BlockRec* __restrict__ blocks, uint32_t prefix) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec r = recs[b.tensor];
  const Range range = block_range(r, b);
  const ProbeKey key = param_key(prefix, r.param_index);
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float z[kVec];
      probe_vec(r.element_offset + i, key, z);
      store_vec(static_cast<T*>(r.x), i, range.end, r.aligned, z);
    }
  });
}

// ---- finite differences ------------------------------------------------------------
template <bool SAVE>
__global__ void __launch_bounds__(kThreads) fd_move_kernel(const TensorRec* __restrict__ recs,
                                                           const BlockRec* __restrict__ blocks, uint32_t prefix,
                                                           const float* __restrict__ delta, float sign) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec r = recs[b.tensor];
  const Range range = block_range(r, b);
  const ProbeKey key = param_key(prefix, r.param_index);
  const float step = sign * *delta;  // exact: sign is +-1
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* x = static_cast<T*>(r.x);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float base[kVec], z[kVec], out[kVec];
      load_vec(static_cast<const T*>(r.src), i, range.end, r.aligned, base);
      if (SAVE) copy_vec(static_cast<T*>(r.aux), static_cast<const T*>(x), i, range.end, r.aligned);
      probe_vec(r.element_offset + i, key, z);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = base[k] + step * z[k];
      store_vec(x, i, range.end, r.aligned, out);
    }
  });
}

template <bool FIRST>
__global__ void __launch_bounds__(kThreads) fd_fold_kernel(const TensorRec* __restrict__ recs,
                                                           const BlockRec* __restrict__ blocks, uint32_t prefix,
                                                           const float* __restrict__ delta, float coefficient) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec r = recs[b.tensor];
  const Range range = block_range(r, b);
  const ProbeKey key = param_key(prefix, r.param_index);
  const float dlt = *delta;
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* acc = static_cast<T*>(r.x);
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float g[kVec], base[kVec] = {}, a[kVec] = {}, z[kVec], out[kVec];
      load_vec(static_cast<const T*>(r.src), i, range.end, r.aligned, g);
      if (r.aux != nullptr) load_vec(static_cast<const T*>(r.aux), i, range.end, r.aligned, base);
      if (!FIRST) load_vec(static_cast<const T*>(acc), i, range.end, r.aligned, a);
      probe_vec(r.element_offset + i, key, z);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float term = fd_term<float>(g[k], base[k], z[k], coefficient, dlt);
        out[k] = FIRST ? term : a[k] + term;
      }
      store_vec(acc, i, range.end, r.aligned, out);
    }
  });
}

// ---- compact state and master weights -------------------------------------------------
// 8-byte accesses for the 8 one-byte codes (int8 m, uint8 D, int8 corrections) of a
// thread's kVec elements: a warp's 32 of them are 256 contiguous bytes, one coalesced
// access; scalar, not a narrower vector, so the 16-byte rule of the data vectors stands.
__device__ __forceinline__ unsigned long long ld_global8(const void* p) {
  unsigned long long v;
  asm volatile("ld.global.u64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void st_global8(void* p, unsigned long long v) {
  asm volatile("st.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// kVec one-byte values (C: int8_t or uint8_t) starting at i, widened to int32.
template <typename C>
__device__ __forceinline__ void load_bytes(const C* p, int64_t i, int64_t end, bool vec, int32_t (&out)[kVec]) {
  static_assert(kVec == 8, "one 8-byte access per thread");
  if (vec && i + kVec <= end) {
    const unsigned long long u = ld_global8(p + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint32_t byte = static_cast<uint32_t>(u >> (8 * k)) & 0xFFu;
      out[k] = static_cast<C>(byte);  // sign-extends an int8 code
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = i + k < end ? static_cast<int32_t>(p[i + k]) : 0;
  }
}
template <typename C>
__device__ __forceinline__ void store_bytes(C* p, int64_t i, int64_t end, bool vec, const int32_t (&in)[kVec]) {
  if (vec && i + kVec <= end) {
    unsigned long long u = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) u |= static_cast<unsigned long long>(static_cast<uint32_t>(in[k]) & 0xFFu) << (8 * k);
    st_global8(p + i, u);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (i + k < end) p[i + k] = static_cast<C>(in[k]);
  }
}
// kVec int16 values (32-bit master corrections): one 16-byte access.
__device__ __forceinline__ void load_shorts(const int16_t* p, int64_t i, int64_t end, bool vec, int32_t (&out)[kVec]) {
  if (vec && i + kVec <= end) {
    const uint4 u = ld_global16(p + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      out[k] = static_cast<int16_t>(static_cast<uint16_t>(lane(u, k / 2) >> (16 * (k % 2))));
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = i + k < end ? static_cast<int32_t>(p[i + k]) : 0;
  }
}
// kVec 16-bit patterns (int16 corrections, or bfloat16 params' bits): one 16-byte access.
__device__ __forceinline__ void store_shorts(void* p, int64_t i, int64_t end, bool vec, const int32_t (&in)[kVec]) {
  uint16_t* q = static_cast<uint16_t*>(p);
  if (vec && i + kVec <= end) {
    uint32_t w[4];
#pragma unroll
    for (int c = 0; c < 4; ++c)
      w[c] = (static_cast<uint32_t>(in[2 * c]) & 0xFFFFu) | (static_cast<uint32_t>(in[2 * c + 1]) << 16);
    st_global16(q + i, make_uint4(w[0], w[1], w[2], w[3]));
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (i + k < end) q[i + k] = static_cast<uint16_t>(in[k]);
  }
}

// The group's scale (encoding.py): a group of kGroup = 32 elements is 4 consecutive
// threads' kVec-element runs (every run starts at a multiple of kVec, a block's chunk at
// a multiple of kGroup), so each thread takes the maximum of its 8 values (0 past the
// tensor's end, as encoding.py pads) and two butterfly shuffles within the 4 lanes give
// all of them the group's. Every lane of the warp must call it (full mask).
static_assert(kGroup == 4 * kVec && kBlockElems % kGroup == 0 && (kThreads * kVec) % kGroup == 0,
              "a group is 4 threads' runs");
template <bool ABS>
__device__ __forceinline__ float group_max(const float (&v)[kVec], int64_t i, int64_t end) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < kVec; ++k) s = nan_max(s, i + k < end ? (ABS ? fabsf(v[k]) : v[k]) : 0.f);
  s = nan_max(s, __shfl_xor_sync(0xffffffffu, s, 1));
  s = nan_max(s, __shfl_xor_sync(0xffffffffu, s, 2));
  return s;
}

// The update of one tensor whose state is compact (SB 16 / 8) or that has a master weight
// (MW 24 / 32; bfloat16 params): decode, compute, group maximum, encode, in one pass.
// The loop runs every thread of the block through the same iterations (a thread past the
// tensor's end computes on zeros and stores nothing), so the shuffles see whole warps.
template <typename T, int MODE, bool SQRT_POWER, int SB, int MW>
__device__ __forceinline__ void update_compact(const TensorRec& r, const BlockRec& b, const Range& range,
                                               const UpdateScalars<float>& s, int64_t n_tensors,
                                               const void* const* __restrict__ ys,
                                               const uint32_t* __restrict__ prefixes, int64_t n_samples, float dlt,
                                               float h_floor) {
  T* x = static_cast<T*>(r.x);
  const T* xt = static_cast<const T*>(r.aux);
  const bool vec = r.aligned;
  for (int64_t base = range.begin; base < range.end; base += kThreads * kVec) {
    const int64_t i = base + threadIdx.x * kVec;
    const bool active = i < range.end;
    const int64_t grp = i / kGroup;
    // 8-bit state, sqrt power, no refresh: the preconditioner sqrt(D) / c2 straight from the
    // codes, (q * (1/255)) * (s / c2) (encoding.hessian_root, eager.preconditioner); D is not
    // decoded. 8-bit refresh: the encoding's root R = sqrt(D_t) is the update's sqrt too.
    constexpr bool kFromCodes = SB == 8 && MODE == RefreshMode::kNone && SQRT_POWER;
    constexpr bool kRoot = SB == 8 && MODE != RefreshMode::kNone;
    // m and d: the new values (0 where no element is: the group maxima read them); root: sqrt(d)
    float m[kVec], d[kVec], root[kVec];
    if (!active) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) m[k] = d[k] = root[k] = 0.f;
    } else {
      // The Hutchinson sum first, with as little held through its divisions (calls on their
      // slow path) as possible: g is read again after it, x_t and the state later still.
      float xv[kVec], g[kVec], h[kVec] = {};
      if (MODE != RefreshMode::kNone) {
        for (int64_t smp = 0; smp < n_samples; ++smp) {
          const T* y = static_cast<const T*>(ys[smp * n_tensors + b.tensor]);
          if (y == nullptr) continue;  // absent: contributes 0
          float yv[kVec], z[kVec];
          load_vec(y, i, range.end, vec && reinterpret_cast<uintptr_t>(y) % 16 == 0, yv);
          if (MODE == RefreshMode::kPrecomputed) {
#pragma unroll
            for (int k = 0; k < kVec; ++k) h[k] += yv[k];
            continue;
          }
          probe_vec(r.element_offset + i, param_key(prefixes[smp], r.param_index), z);
          if (MODE == RefreshMode::kFdDirect) {
            load_vec(static_cast<const T*>(r.src), i, range.end, vec, g);
#pragma unroll
            for (int k = 0; k < kVec; ++k) yv[k] = (yv[k] - g[k]) * z[k];
#pragma unroll
            for (int k = 0; k < kVec; ++k) h[k] += yv[k] / dlt;
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) h[k] += z[k] * yv[k];
          }
        }
      }
      load_vec(static_cast<const T*>(r.src), i, range.end, vec, g);
      if (MODE != RefreshMode::kNone) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (MODE == RefreshMode::kAutograd) h[k] = h[k] / static_cast<float>(n_samples);
          else h[k] = fd_magnitude<float>(h[k], g[k], h_floor);
        }
      }
      load_vec(xt, i, range.end, vec, xv);
      if (MW != 0) {  // the master weight: the param's bits and the correction below them
        int32_t c[kVec];
        if (MW == 24) load_bytes(static_cast<const int8_t*>(r.corr), i, range.end, vec, c);
        else load_shorts(static_cast<const int16_t*>(r.corr), i, range.end, vec, c);
#pragma unroll
        for (int k = 0; k < kVec; ++k)  // a bfloat16 widened to float32 is its bits << 16
          xv[k] = join_master<MW == 24 ? 24 : 32>(static_cast<uint16_t>(float_bits(xv[k]) >> 16), c[k]);
      }
      float pre[kVec];
      if (SB == 8) {
        int32_t qm[kVec], qd[kVec];
        load_bytes(static_cast<const int8_t*>(r.m), i, range.end, vec, qm);
        load_bytes(static_cast<const uint8_t*>(r.d), i, range.end, vec, qd);
        const float sm = r.m_scale[grp], sd = r.d_scale[grp];
        if (kFromCodes) {
          const float sc = sd / s.c2;  // s / c2, c2 in float32: once per run of kVec elements
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            m[k] = decode_m(qm[k], sm);
            pre[k] = hessian_root(qd[k], sc);
          }
        } else if (MODE == RefreshMode::kNone) {  // another power: D^p / c2 of the decoded D
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            m[k] = decode_m(qm[k], sm);
            pre[k] = hessian_power<float, SQRT_POWER>(decode_d(qd[k], sd), s.power) / s.c2;
          }
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            m[k] = decode_m(qm[k], sm);
            d[k] = decode_d(qd[k], sd);
          }
        }
      } else if (SB == 16) {
        load_vec(static_cast<const __nv_bfloat16*>(r.m), i, range.end, vec, m);
        load_vec(static_cast<const __nv_bfloat16*>(r.d), i, range.end, vec, d);
      } else {
        load_vec(static_cast<const float*>(r.m), i, range.end, vec, m);
        load_vec(static_cast<const float*>(r.d), i, range.end, vec, d);
      }
      if (MODE != RefreshMode::kNone) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) d[k] = hessian_ema<float>(d[k], h[k], s);
      }
      if (kRoot) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) root[k] = sqrtf(d[k]);  // correctly rounded (-prec-sqrt)
      }
      float out[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        // D^p / c2 where it does not come from the codes (computed here, next to its use: a
        // loop of its own kept every power's result live across the others' calls, and spilled)
        if (!(SB == 8 && MODE == RefreshMode::kNone))
          pre[k] = (kRoot && SQRT_POWER ? root[k] : hessian_power<float, SQRT_POWER>(d[k], s.power)) / s.c2;
        out[k] = sassha_update_pre<float>(xv[k], m[k], pre[k], g[k], s);
      }
      if (MW != 0) {
        int32_t bits[kVec], c[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          uint16_t pb;
          split_master<MW == 24 ? 24 : 32>(out[k], pb, c[k]);
          bits[k] = pb;
        }
        store_shorts(x, i, range.end, vec, bits);
        if (MW == 24) store_bytes(static_cast<int8_t*>(r.corr), i, range.end, vec, c);
        else store_shorts(r.corr, i, range.end, vec, c);
      } else {
        store_vec(x, i, range.end, vec, out);
      }
      if (SB == 16) {
        store_vec(static_cast<__nv_bfloat16*>(r.m), i, range.end, vec, m);
        if (MODE != RefreshMode::kNone) store_vec(static_cast<__nv_bfloat16*>(r.d), i, range.end, vec, d);
      } else if (SB == 32) {
        store_vec(static_cast<float*>(r.m), i, range.end, vec, m);
        if (MODE != RefreshMode::kNone) store_vec(static_cast<float*>(r.d), i, range.end, vec, d);
      }
    }
    if (SB == 8) {  // every lane: the shuffles take whole warps
      const float sm = group_max<true>(m, i, range.end);
      const float mr = m_scale_reciprocal(sm);  // once per group
      int32_t q[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = encode_m(m[k], mr);
      if (active) {
        store_bytes(static_cast<int8_t*>(r.m), i, range.end, vec, q);
        if ((threadIdx.x & 3) == 0) r.m_scale[grp] = sm;  // the group's first run is active if any is
      }
      if (MODE != RefreshMode::kNone) {
        const float sd = group_max<false>(root, i, range.end);  // the scale of sqrt(D)
#pragma unroll
        for (int k = 0; k < kVec; ++k) q[k] = encode_d(d[k], root[k], sd);
        if (active) {
          store_bytes(static_cast<uint8_t*>(r.d), i, range.end, vec, q);
          if ((threadIdx.x & 3) == 0) r.d_scale[grp] = sd;
        }
      }
    }
  }
}

// ---- update -------------------------------------------------------------------------
// SB: the launch's state_bits. A tensor with float32 state and no master weight takes the
// plain loop (SB 32); the others update_compact.
template <int MODE, bool SQRT_POWER, int SB>
__global__ void __launch_bounds__(kThreads) update_kernel(const TensorRec* __restrict__ recs,
                                                          const BlockRec* __restrict__ blocks, int64_t n_tensors,
                                                          const double* __restrict__ scalars, double power,
                                                          const void* const* __restrict__ ys,
                                                          const uint32_t* __restrict__ prefixes, int64_t n_samples,
                                                          const float* __restrict__ fd) {
  const BlockRec b = blocks[blockIdx.x];
  const TensorRec r = recs[b.tensor];
  const Range range = block_range(r, b);
  const UpdateScalars<float> s = update_scalars<float>(scalars + b.tensor * UpdateCol::kCount, power);
  const float dlt = MODE == RefreshMode::kFdDirect ? fd[0] : 1.f;
  const float h_floor = MODE == RefreshMode::kFdDirect || MODE == RefreshMode::kPrecomputed ? fd[1] : 0.f;
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* x = static_cast<T*>(r.x);
    const T* xt = static_cast<const T*>(r.aux);
    if (!s.live) {  // restore x_t bit for bit, leave the state alone
      if (xt != x)
        for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec)
          copy_vec(x, xt, i, range.end, r.aligned);
      return;
    }
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (r.master_bits == 24) {
        update_compact<T, MODE, SQRT_POWER, SB, 24>(r, b, range, s, n_tensors, ys, prefixes, n_samples, dlt, h_floor);
        return;
      }
      if (r.master_bits == 32) {
        update_compact<T, MODE, SQRT_POWER, SB, 32>(r, b, range, s, n_tensors, ys, prefixes, n_samples, dlt, h_floor);
        return;
      }
    }
    if constexpr (SB != 32) {
      update_compact<T, MODE, SQRT_POWER, SB, 0>(r, b, range, s, n_tensors, ys, prefixes, n_samples, dlt, h_floor);
      return;
    }
    if constexpr (SB == 32) {  // the plain loop: float32 state, no master weight
    for (int64_t i = range.begin + threadIdx.x * kVec; i < range.end; i += kThreads * kVec) {
      float xv[kVec], g[kVec], m[kVec], d[kVec], h[kVec] = {};
      load_vec(static_cast<const T*>(r.src), i, range.end, r.aligned, g);
      if (MODE != RefreshMode::kNone) {
        for (int64_t smp = 0; smp < n_samples; ++smp) {
          const T* y = static_cast<const T*>(ys[smp * n_tensors + b.tensor]);
          if (y == nullptr) continue;  // absent: contributes 0
          float yv[kVec], z[kVec];
          load_vec(y, i, range.end, r.aligned && reinterpret_cast<uintptr_t>(y) % 16 == 0, yv);
          if (MODE == RefreshMode::kPrecomputed) {
#pragma unroll
            for (int k = 0; k < kVec; ++k) h[k] += yv[k];
            continue;
          }
          probe_vec(r.element_offset + i, param_key(prefixes[smp], r.param_index), z);
#pragma unroll
          for (int k = 0; k < kVec; ++k)
            h[k] += MODE == RefreshMode::kFdDirect ? (yv[k] - g[k]) * z[k] / dlt : z[k] * yv[k];
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (MODE == RefreshMode::kAutograd) h[k] = h[k] / static_cast<float>(n_samples);
          else h[k] = fd_magnitude<float>(h[k], g[k], h_floor);
        }
      }
      // x_t and the state are read after the Hutchinson sum: not held through its
      // divisions (whose slow path is a call that would spill them)
      load_vec(xt, i, range.end, r.aligned, xv);
      load_vec(static_cast<const float*>(r.m), i, range.end, r.aligned, m);
      load_vec(static_cast<const float*>(r.d), i, range.end, r.aligned, d);
      if (MODE != RefreshMode::kNone) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) d[k] = hessian_ema<float>(d[k], h[k], s);
      }
      float out[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = sassha_update<float, SQRT_POWER>(xv[k], m[k], d[k], g[k], s);
      store_vec(x, i, range.end, r.aligned, out);
      store_vec(static_cast<float*>(r.m), i, range.end, r.aligned, m);
      if (MODE != RefreshMode::kNone) store_vec(static_cast<float*>(r.d), i, range.end, r.aligned, d);
    }
    }
  });
}

}  // namespace

// ---- launchers ---------------------------------------------------------------------
void launch_sq_norm(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, bool adaptive, bool acc64,
                    void* partials, void* out, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (acc64) {
    if (adaptive) sq_norm_kernel<double, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<double*>(partials));
    else sq_norm_kernel<double, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<double*>(partials));
    sum_partials(static_cast<double*>(partials), n_blocks, static_cast<double*>(out), st);
  } else {
    if (adaptive) sq_norm_kernel<float, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<float*>(partials));
    else sq_norm_kernel<float, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, static_cast<float*>(partials));
    sum_partials(static_cast<float*>(partials), n_blocks, static_cast<float*>(out), st);
  }
}

void launch_perturb(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, const void* sq_norm, bool norm64,
                    const double* groups, double sign, bool adaptive, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (norm64) {
    const auto* n = static_cast<const double*>(sq_norm);
    if (adaptive) perturb_kernel<double, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n, groups, sign);
    else perturb_kernel<double, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n, groups, sign);
  } else {
    const auto* n = static_cast<const float*>(sq_norm);
    if (adaptive) perturb_kernel<float, true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n, groups, sign);
    else perturb_kernel<float, false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n, groups, sign);
  }
}

void launch_probes(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, uint32_t prefix, void* stream) {
  probes_kernel<<<n_blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(recs, blocks, prefix);
}

void launch_fd_move(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, uint32_t prefix,
                    const float* delta, float sign, bool save, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (save) fd_move_kernel<true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, prefix, delta, sign);
  else fd_move_kernel<false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, prefix, delta, sign);
}

void launch_fd_fold(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, uint32_t prefix,
                    const float* delta, float coefficient, bool first, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (first) fd_fold_kernel<true><<<n_blocks, kThreads, 0, st>>>(recs, blocks, prefix, delta, coefficient);
  else fd_fold_kernel<false><<<n_blocks, kThreads, 0, st>>>(recs, blocks, prefix, delta, coefficient);
}

template <int MODE, int SB>
void launch_update_mode(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, int64_t n_tensors,
                        const double* scalars, double power, const void* const* ys, const uint32_t* prefixes,
                        int64_t n_samples, const float* fd, cudaStream_t st) {
  if (power == 0.5) {
    update_kernel<MODE, true, SB><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n_tensors, scalars, power, ys,
                                                                 prefixes, n_samples, fd);
  } else {
    update_kernel<MODE, false, SB><<<n_blocks, kThreads, 0, st>>>(recs, blocks, n_tensors, scalars, power, ys,
                                                                  prefixes, n_samples, fd);
  }
}

template <int SB>
void launch_update_bits(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, int64_t n_tensors,
                        const double* scalars, double power, int refresh_mode, const void* const* ys,
                        const uint32_t* prefixes, int64_t n_samples, const float* fd, cudaStream_t st) {
  switch (refresh_mode) {
    case RefreshMode::kNone:
      launch_update_mode<RefreshMode::kNone, SB>(recs, blocks, n_blocks, n_tensors, scalars, power, ys, prefixes,
                                                 n_samples, fd, st);
      break;
    case RefreshMode::kAutograd:
      launch_update_mode<RefreshMode::kAutograd, SB>(recs, blocks, n_blocks, n_tensors, scalars, power, ys,
                                                     prefixes, n_samples, fd, st);
      break;
    case RefreshMode::kFdDirect:
      launch_update_mode<RefreshMode::kFdDirect, SB>(recs, blocks, n_blocks, n_tensors, scalars, power, ys,
                                                     prefixes, n_samples, fd, st);
      break;
    default:
      launch_update_mode<RefreshMode::kPrecomputed, SB>(recs, blocks, n_blocks, n_tensors, scalars, power, ys,
                                                        prefixes, n_samples, fd, st);
  }
}

void launch_update(const TensorRec* recs, const BlockRec* blocks, int64_t n_blocks, int64_t n_tensors,
                   const double* scalars, double power, int refresh_mode, const void* const* ys,
                   const uint32_t* prefixes, int64_t n_samples, const float* fd, int state_bits, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (state_bits) {
    case 8:
      launch_update_bits<8>(recs, blocks, n_blocks, n_tensors, scalars, power, refresh_mode, ys, prefixes, n_samples,
                            fd, st);
      break;
    case 16:
      launch_update_bits<16>(recs, blocks, n_blocks, n_tensors, scalars, power, refresh_mode, ys, prefixes, n_samples,
                             fd, st);
      break;
    default:
      launch_update_bits<32>(recs, blocks, n_blocks, n_tensors, scalars, power, refresh_mode, ys, prefixes, n_samples,
                             fd, st);
  }
}

}  // namespace cuda
}  // namespace sassha
