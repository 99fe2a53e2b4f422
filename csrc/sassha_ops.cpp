// SASSHA's four phases as PyTorch custom operators, and their CPU kernels.
//
// Bindings: TORCH_LIBRARY custom operators, not pybind11. Reasons:
//  * one op schema, with a CPU kernel here and a CUDA kernel in sassha_cuda.cpp;
//    the dispatcher routes a call by the tensors' device, so Python calls
//    torch.ops.sassha_fused.<op> the same way for both backends;
//  * the library is loaded with torch.ops.load_library: no Python C-API, no
//    pybind11 and no <torch/extension.h> (a much heavier header) in this
//    translation unit, which keeps the build short on small machines;
//  * custom ops are visible to torch.compile / the profiler under their names.
//
// Layout of the work: every op takes flat lists covering all tensors of all
// param groups (and all dtypes). The lists are cut into chunks of kChunk
// elements, and at::parallel_for walks one flat chunk list, so many small
// tensors parallelise as well as a few big ones. The per-element math lives in
// sassha_math.h; this file only walks tensors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <string>
#include <vector>

#include "sassha_math.h"

#define SASSHA_STR_(x) #x
#define SASSHA_STR(x) SASSHA_STR_(x)
#ifndef SASSHA_FUSED_SOURCES_HASH
#define SASSHA_FUSED_SOURCES_HASH unknown
#endif

// Found by sassha_fused/_build.py in the shared library's bytes, without
// loading it, to tell whether a prebuilt extension matches the sources.
extern "C" __attribute__((used)) const char sassha_fused_sources_marker[] =
    "SASSHA_FUSED_SOURCES_HASH=" SASSHA_STR(SASSHA_FUSED_SOURCES_HASH) ";";

namespace sassha {
namespace {

// Elements per unit of parallel work: a multiple of the 32-element probe word,
// so a chunk never splits a word; 64 KiB of fp32 per array per chunk.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t tensor;  // index into the op's lists
  int64_t begin;   // first element (a multiple of kChunk)
  int64_t end;     // one past the last element
};

std::vector<Chunk> make_chunks(const at::TensorList& tensors) {
  std::vector<Chunk> chunks;
  for (int64_t j = 0; j < static_cast<int64_t>(tensors.size()); ++j) {
    const int64_t n = tensors[j].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({j, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// Threads take chunks from a shared counter rather than a fixed slice each:
// tensors of different dtypes (and refresh work) cost different amounts per
// chunk, and on a shared machine a thread that is descheduled for a while
// leaves its chunks to the others instead of holding up the whole phase.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1) {
    for (const Chunk& c : chunks) f(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < n;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      f(chunks[c]);
    }
  });
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Calls f(T{}) with T the C++ type of a supported param dtype.
template <typename F>
void dispatch_param_dtype(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "sassha_fused: unsupported dtype ", t);
  }
}

template <typename T> using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- argument checks -------------------------------------------------------
void check_same_length(const char* op, const char* a, size_t na, const char* b, size_t nb) {
  TORCH_CHECK(na == nb, "sassha_fused::", op, ": got ", na, " ", a, " but ", nb, " ", b,
              "; pass exactly one entry per parameter in every list");
}

void check_param(const char* op, const at::Tensor& p, int64_t j, const at::Device& device) {
  TORCH_CHECK(p.device() == device, "sassha_fused::", op, ": params[", j, "] is on ", p.device(),
              " but params[0] is on ", device,
              "; call the op once per device (the optimizer groups tensors by device)");
  TORCH_CHECK(is_supported_dtype(p.scalar_type()), "sassha_fused::", op, ": params[", j, "] has dtype ",
              p.scalar_type(), "; supported are float32, float64, bfloat16 and float16 "
              "(use the 'foreach' backend for other dtypes)");
  TORCH_CHECK(p.is_contiguous(), "sassha_fused::", op, ": params[", j,
              "] is not contiguous; pass contiguous tensors (the Python backend sends "
              "non-contiguous params to the eager path)");
}

void check_companion(const char* op, const char* what, const at::Tensor& t, int64_t j,
                     const at::Tensor& p, at::ScalarType expected) {
  TORCH_CHECK(t.defined(), "sassha_fused::", op, ": ", what, "[", j, "] is undefined");
  TORCH_CHECK(t.device() == p.device(), "sassha_fused::", op, ": ", what, "[", j, "] is on ", t.device(),
              " but its param is on ", p.device(), "; keep each parameter's tensors on its device");
  TORCH_CHECK(t.scalar_type() == expected, "sassha_fused::", op, ": ", what, "[", j, "] has dtype ",
              t.scalar_type(), " but ", expected, " is expected for a ", p.scalar_type(),
              " parameter (16-bit params keep float32 optimizer state)");
  TORCH_CHECK(t.numel() == p.numel(), "sassha_fused::", op, ": ", what, "[", j, "] has ", t.numel(),
              " elements but its param has ", p.numel(), "; shapes must match");
  TORCH_CHECK(t.is_contiguous(), "sassha_fused::", op, ": ", what, "[", j,
              "] is not contiguous; pass contiguous tensors");
}

// The heavy loops are compiled twice, for AVX2 and for the baseline x86-64, and
// the loader picks one per machine (GCC function multi-versioning): the update's
// sqrt and division are compute-bound at SSE2 width on two cores. Never
// -march=native: the library may be built on one machine and run on another.
#if defined(__GNUC__)
#define SASSHA_ALWAYS_INLINE __attribute__((always_inline))
#else
#define SASSHA_ALWAYS_INLINE
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SASSHA_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SASSHA_CPU_CLONES
#endif

// ---- phase 1: squared norm ---------------------------------------------------
// Each chunk sums into its own slot (kLanes independent accumulators so the
// loop vectorises without reassociation flags), then the slots are added in
// chunk order in double: the result does not depend on the thread count.
constexpr int kLanes = 16;

template <typename A, bool ADAPTIVE, typename V, typename X>
SASSHA_CPU_CLONES double chunk_sq_norm(const V* v, const X* x, int64_t begin, int64_t end) {
  A acc[kLanes] = {};
  const V* vp = v + begin;
  const X* xp = ADAPTIVE ? x + begin : nullptr;
  const int64_t blocks = (end - begin) / kLanes;
  // A walking pointer and an explicit simd loop over the lanes keep the partial
  // sums in vector registers (indexing v[i + l] made GCC spill them lane by lane).
  for (int64_t k = 0; k < blocks; ++k) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      if constexpr (ADAPTIVE) {
        acc[l] += sq_norm_term<A, true>(static_cast<A>(vp[l]), static_cast<A>(xp[l]));
      } else {
        acc[l] += sq_norm_term<A, false>(static_cast<A>(vp[l]), A(0));
      }
    }
    vp += kLanes;
    if constexpr (ADAPTIVE) xp += kLanes;
  }
  for (int64_t i = begin + blocks * kLanes; i < end; ++i) {
    acc[0] += sq_norm_term<A, ADAPTIVE>(static_cast<A>(v[i]), ADAPTIVE ? static_cast<A>(x[i]) : A(0));
  }
  double total = 0;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(acc[l]);
  return total;
}

template <typename A, bool ADAPTIVE>
double chunk_sq_norm_dispatch(const at::Tensor& v, const at::Tensor& x, const Chunk& c) {
  double out = 0;
  dispatch_param_dtype(x.scalar_type(), [&](auto tag_x) {
    using X = decltype(tag_x);
    const X* xp = ADAPTIVE ? static_cast<const X*>(x.const_data_ptr()) : nullptr;
    dispatch_param_dtype(v.scalar_type(), [&](auto tag_v) {
      using V = decltype(tag_v);
      out = chunk_sq_norm<A, ADAPTIVE>(static_cast<const V*>(v.const_data_ptr()), xp, c.begin, c.end);
    });
  });
  return out;
}

at::Tensor sq_norm_cpu(at::TensorList sources, at::TensorList params, bool adaptive, bool acc_fp64) {
  check_same_length("sq_norm", "sources", sources.size(), "params", params.size());
  TORCH_CHECK(!params.empty(), "sassha_fused::sq_norm: empty lists; the caller returns zero itself");
  const auto device = params[0].device();
  for (size_t j = 0; j < params.size(); ++j) {
    check_param("sq_norm", params[j], j, device);
    const auto st = sources[j].scalar_type();
    TORCH_CHECK(st == params[j].scalar_type() || st == math_dtype(params[j].scalar_type()),
                "sassha_fused::sq_norm: sources[", j, "] has dtype ", st,
                " but must be its param's dtype or its math dtype");
    check_companion("sq_norm", "sources", sources[j], j, params[j], st);
  }
  const auto chunks = make_chunks(params);
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const auto& v = sources[c.tensor];
    const auto& x = params[c.tensor];
    double s;
    if (acc_fp64) {
      s = adaptive ? chunk_sq_norm_dispatch<double, true>(v, x, c) : chunk_sq_norm_dispatch<double, false>(v, x, c);
    } else {
      s = adaptive ? chunk_sq_norm_dispatch<float, true>(v, x, c) : chunk_sq_norm_dispatch<float, false>(v, x, c);
    }
    partial[&c - chunks.data()] = s;
  });
  double total = 0;
  for (double s : partial) total += s;
  auto out = at::empty({}, params[0].options().dtype(acc_fp64 ? at::kDouble : at::kFloat));
  if (acc_fp64) {
    *out.mutable_data_ptr<double>() = total;
  } else {
    *out.mutable_data_ptr<float>() = static_cast<float>(total);
  }
  return out;
}


// ---- streaming stores -----------------------------------------------------------
// The arrays a step writes (x, backup, m) are far larger than the last-level cache
// and are not read again within the phase, so an ordinary store first reads the
// line it overwrites (read-for-ownership): a third of the traffic of a write-heavy
// phase. Results are computed into a small tile that stays in L1 (by the loops
// below, which the compiler vectorises) and leave it with non-temporal stores.
constexpr int64_t kTile = 256;

template <typename T>
inline void store_tile(T* dst, const T* src, int64_t n) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && n % 4 == 0) {
      for (int64_t i = 0; i < n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && n % 2 == 0) {
      for (int64_t i = 0; i < n; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
      return;
    }
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

// Orders the streaming stores of a chunk before anything the caller does next.
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---- phase 2: perturbation ---------------------------------------------------
template <typename T, typename V, bool ADAPTIVE>
SASSHA_CPU_CLONES void chunk_perturb(T* x, T* backup, const V* v, math_t<T> scale, int64_t begin, int64_t end) {
  using M = math_t<T>;
  alignas(64) T x_new[kTile];
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    const T* xt = x + t;
    const V* vt = v + t;
    for (int64_t i = 0; i < n; ++i) {
      x_new[i] = static_cast<T>(perturb_value<M, ADAPTIVE>(static_cast<M>(xt[i]), static_cast<M>(vt[i]), scale));
    }
    store_tile(backup + t, xt, n);  // before x is overwritten (backup may alias x)
    store_tile(x + t, x_new, n);
  }
  store_fence();
}

void perturb_cpu(at::TensorList params, at::TensorList sources, at::TensorList backups, const at::Tensor& sq_norm,
                 c10::ArrayRef<double> sign_rho, c10::ArrayRef<double> perturb_eps, bool adaptive) {
  const size_t n = params.size();
  check_same_length("perturb", "params", n, "sources", sources.size());
  check_same_length("perturb", "params", n, "backups", backups.size());
  check_same_length("perturb", "params", n, "sign_rho values", sign_rho.size());
  check_same_length("perturb", "params", n, "perturb_eps values", perturb_eps.size());
  if (n == 0) return;
  const auto device = params[0].device();
  for (size_t j = 0; j < n; ++j) {
    const auto pt = params[j].scalar_type();
    check_param("perturb", params[j], j, device);
    const auto st = sources[j].scalar_type();
    TORCH_CHECK(st == pt || st == math_dtype(pt), "sassha_fused::perturb: sources[", j, "] has dtype ", st,
                " but must be its param's dtype or its math dtype");
    check_companion("perturb", "sources", sources[j], j, params[j], st);
    check_companion("perturb", "backups", backups[j], j, params[j], pt);
  }
  TORCH_CHECK(sq_norm.numel() == 1 && (sq_norm.scalar_type() == at::kFloat || sq_norm.scalar_type() == at::kDouble),
              "sassha_fused::perturb: sq_norm must be a one-element float32/float64 tensor (from sq_norm)");
  // The scale is computed here from the norm tensor, per tensor, as eager.py does.
  const at::Tensor norm = sq_norm.to(at::kCPU);
  const bool acc64 = norm.scalar_type() == at::kDouble;
  const double norm_value = acc64 ? *norm.const_data_ptr<double>() : static_cast<double>(*norm.const_data_ptr<float>());
  std::vector<double> scales(n);
  for (size_t j = 0; j < n; ++j) {
    scales[j] = acc64 ? perturb_scale<double>(norm_value, sign_rho[j], perturb_eps[j])
                      : static_cast<double>(perturb_scale<float>(static_cast<float>(norm_value), sign_rho[j], perturb_eps[j]));
  }
  const auto chunks = make_chunks(params);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    dispatch_param_dtype(params[j].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      T* x = static_cast<T*>(params[j].data_ptr());
      T* b = static_cast<T*>(backups[j].data_ptr());
      const M scale = static_cast<M>(scales[j]);
      if (sources[j].scalar_type() == params[j].scalar_type()) {
        const T* v = static_cast<const T*>(sources[j].const_data_ptr());
        adaptive ? chunk_perturb<T, T, true>(x, b, v, scale, c.begin, c.end)
                 : chunk_perturb<T, T, false>(x, b, v, scale, c.begin, c.end);
      } else {
        const M* v = static_cast<const M*>(sources[j].const_data_ptr());
        adaptive ? chunk_perturb<T, M, true>(x, b, v, scale, c.begin, c.end)
                 : chunk_perturb<T, M, false>(x, b, v, scale, c.begin, c.end);
      }
    });
  });
}

// ---- phase 3: probes ----------------------------------------------------------
// Whole words take a fixed-trip-count loop (vectorised); only a tensor's last
// word can be partial.
template <typename T>
SASSHA_CPU_CLONES void chunk_probes(T* z, uint32_t k0, uint32_t k1, int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; w += kProbeWordBits) {
    const uint32_t bits = probe_bits(static_cast<uint32_t>(w >> 5), k0, k1);
    T* zw = z + w;
    if (end - w >= kProbeWordBits) {
      for (uint32_t b = 0; b < kProbeWordBits; ++b) zw[b] = static_cast<T>(probe_sign<float>(bits, b));
    } else {
      for (uint32_t b = 0; b < end - w; ++b) zw[b] = static_cast<T>(probe_sign<float>(bits, b));
    }
  }
}

void probes_cpu(at::TensorList out, c10::ArrayRef<int64_t> keys) {
  TORCH_CHECK(keys.size() == 2 * out.size(), "sassha_fused::probes: got ", keys.size(), " key words for ",
              out.size(), " tensors; pass (k0, k1) of probes.probe_key for each tensor");
  if (out.empty()) return;
  const auto device = out[0].device();
  for (size_t j = 0; j < out.size(); ++j) check_param("probes", out[j], j, device);
  const auto chunks = make_chunks(out);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    const auto k0 = static_cast<uint32_t>(keys[2 * j]);
    const auto k1 = static_cast<uint32_t>(keys[2 * j + 1]);
    dispatch_param_dtype(out[j].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      chunk_probes<T>(static_cast<T*>(out[j].data_ptr()), k0, k1, c.begin, c.end);
    });
  });
}

// ---- phase 4: update ----------------------------------------------------------
// Fields of the per-tensor ``scalars`` list, kScalarsPerTensor doubles each.
enum ScalarField {
  kBeta1, kBeta2, kLr, kWeightDecay, kEps, kPower, kBiasCorrection1, kBiasCorrection2, kScalarsPerTensor
};

template <typename M>
UpdateScalars<M> update_scalars(const double* s, int64_t n_samples) {
  UpdateScalars<M> u;
  u.beta1 = static_cast<M>(s[kBeta1]);
  u.one_minus_beta1 = static_cast<M>(1.0 - s[kBeta1]);
  u.beta2 = static_cast<M>(s[kBeta2]);
  u.one_minus_beta2 = static_cast<M>(1.0 - s[kBeta2]);
  u.decay = static_cast<M>(1.0 - s[kLr] * s[kWeightDecay]);
  u.neg_step_size = static_cast<M>(-(s[kLr] / s[kBiasCorrection1]));
  u.inv_bias_correction2 = static_cast<M>(1.0 / s[kBiasCorrection2]);
  u.eps = static_cast<M>(s[kEps]);
  u.power = static_cast<M>(s[kPower]);
  u.n_samples = static_cast<M>(n_samples);
  return u;
}

// One chunk of one tensor. x_t comes from ``backup`` (which may alias ``x``);
// every array is read once and written once. On refresh steps the probes are
// regenerated word by word from the counters, never read from memory.
template <typename T, bool REFRESH, bool SQRT_POWER>
SASSHA_CPU_CLONES void chunk_update(T* x, const T* backup, const T* g, math_t<T>* m, math_t<T>* d, const T* const* hz,
                  const uint32_t* keys, int64_t n_samples, const UpdateScalars<math_t<T>>& s,
                  int64_t begin, int64_t end) {
  using M = math_t<T>;
  if (!REFRESH) {
    alignas(64) T x_new[kTile];
    alignas(64) M m_new[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t n = std::min(kTile, end - t);
      const T* bt = backup + t;
      const T* gt = g + t;
      const M* mt = m + t;
      const M* dt = d + t;
      for (int64_t i = 0; i < n; ++i) {
        M mi = mt[i];
        x_new[i] = static_cast<T>(sassha_update<M, SQRT_POWER>(static_cast<M>(bt[i]), mi, dt[i], static_cast<M>(gt[i]), s));
        m_new[i] = mi;
      }
      store_tile(x + t, x_new, n);
      store_tile(m + t, m_new, n);
    }
    store_fence();
    return;
  }
  // A probe word (32 elements) at a time: the sample mean of z * Hz, then the
  // update into small local arrays that are stored afterwards, so the compute loop
  // only reads (backup may alias x) and vectorises; whole words have a fixed trip count.
  alignas(64) M h[kProbeWordBits];
  alignas(64) T x_new[kProbeWordBits];
  alignas(64) M m_new[kProbeWordBits];
  alignas(64) M d_new[kProbeWordBits];
  for (int64_t w = begin; w < end; w += kProbeWordBits) {
    const int64_t len = std::min<int64_t>(end - w, kProbeWordBits);
    for (int64_t b = 0; b < kProbeWordBits; ++b) h[b] = M(0);
    for (int64_t smp = 0; smp < n_samples; ++smp) {
      const T* hs = hz[smp];
      if (hs == nullptr) continue;  // param absent from the graph: Hz = 0
      const uint32_t bits = probe_bits(static_cast<uint32_t>(w >> 5), keys[2 * smp], keys[2 * smp + 1]);
      const T* hw = hs + w;
      if (len == kProbeWordBits) {
        for (uint32_t b = 0; b < kProbeWordBits; ++b) h[b] += probe_sign<M>(bits, b) * static_cast<M>(hw[b]);
      } else {
        for (uint32_t b = 0; b < len; ++b) h[b] += probe_sign<M>(bits, b) * static_cast<M>(hw[b]);
      }
    }
    const T* bw = backup + w;
    const T* gw = g + w;
    const M* mw = m + w;
    const M* dw = d + w;
    auto compute = [&](int64_t n) SASSHA_ALWAYS_INLINE {
      for (int64_t b = 0; b < n; ++b) {
        const M di = hessian_ema<M>(dw[b], h[b], s);
        M mi = mw[b];
        x_new[b] = static_cast<T>(sassha_update<M, SQRT_POWER>(static_cast<M>(bw[b]), mi, di, static_cast<M>(gw[b]), s));
        m_new[b] = mi;
        d_new[b] = di;
      }
    };
    if (len == kProbeWordBits) {
      compute(kProbeWordBits);
    } else {
      compute(len);
    }
    std::memcpy(x + w, x_new, len * sizeof(T));
    std::memcpy(m + w, m_new, len * sizeof(M));
    std::memcpy(d + w, d_new, len * sizeof(M));
  }
}

void update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_hessian_diags, at::TensorList backups,
                const c10::List<std::optional<at::Tensor>>& hvps, c10::ArrayRef<int64_t> keys,
                c10::ArrayRef<double> scalars, int64_t n_samples, bool refresh) {
  const size_t n = params.size();
  check_same_length("update", "params", n, "grads", grads.size());
  check_same_length("update", "params", n, "exp_avgs", exp_avgs.size());
  check_same_length("update", "params", n, "exp_hessian_diags", exp_hessian_diags.size());
  check_same_length("update", "params", n, "backups", backups.size());
  TORCH_CHECK(scalars.size() == kScalarsPerTensor * n, "sassha_fused::update: got ", scalars.size(),
              " scalars for ", n, " params; pass ", static_cast<int>(kScalarsPerTensor),
              " per param (beta1, beta2, lr, weight_decay, eps, power, 1 - beta1^t, c2)");
  if (refresh) {
    TORCH_CHECK(n_samples >= 1, "sassha_fused::update: n_samples must be >= 1 on a refresh step");
    TORCH_CHECK(hvps.size() == static_cast<size_t>(n_samples) * n, "sassha_fused::update: got ", hvps.size(),
                " hvps for ", n_samples, " samples x ", n, " params; pass hvps[s * n_params + j] (None for Hz = 0)");
    TORCH_CHECK(keys.size() == 2 * hvps.size(), "sassha_fused::update: got ", keys.size(), " key words; pass (k0, k1) ",
                "of probes.probe_key for every (sample, param), in the order of hvps");
  }
  if (n == 0) return;
  const auto device = params[0].device();
  std::vector<const void*> hz_ptrs(refresh ? hvps.size() : 0, nullptr);
  std::vector<uint32_t> key32(refresh ? keys.size() : 0);
  for (size_t j = 0; j < n; ++j) {
    const auto& p = params[j];
    const auto pt = p.scalar_type();
    check_param("update", p, j, device);
    check_companion("update", "grads", grads[j], j, p, pt);
    check_companion("update", "backups", backups[j], j, p, pt);
    check_companion("update", "exp_avgs", exp_avgs[j], j, p, math_dtype(pt));
    check_companion("update", "exp_hessian_diags", exp_hessian_diags[j], j, p, math_dtype(pt));
  }
  if (refresh) {
    for (size_t k = 0; k < hvps.size(); ++k) {
      const std::optional<at::Tensor> h = hvps[k];
      const size_t j = k % n;
      if (h.has_value() && h->defined()) {
        check_companion("update", "hvps", *h, static_cast<int64_t>(k), params[j], params[j].scalar_type());
        hz_ptrs[k] = h->const_data_ptr();
      }
    }
    for (size_t k = 0; k < keys.size(); ++k) key32[k] = static_cast<uint32_t>(keys[k]);
  }
  const auto chunks = make_chunks(params);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    const double* sj = scalars.data() + kScalarsPerTensor * j;
    const bool sqrt_power = sj[kPower] == 0.5;
    dispatch_param_dtype(params[j].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      const auto s = update_scalars<M>(sj, n_samples);
      T* x = static_cast<T*>(params[j].data_ptr());
      const T* b = static_cast<const T*>(backups[j].const_data_ptr());
      const T* g = static_cast<const T*>(grads[j].const_data_ptr());
      M* m = static_cast<M*>(exp_avgs[j].data_ptr());
      M* d = static_cast<M*>(exp_hessian_diags[j].data_ptr());
      if (!refresh) {
        sqrt_power ? chunk_update<T, false, true>(x, b, g, m, d, nullptr, nullptr, 0, s, c.begin, c.end)
                   : chunk_update<T, false, false>(x, b, g, m, d, nullptr, nullptr, 0, s, c.begin, c.end);
        return;
      }
      // Hz pointers and keys of this tensor, one per sample.
      std::vector<const T*> hz(n_samples);
      std::vector<uint32_t> kk(2 * n_samples);
      for (int64_t smp = 0; smp < n_samples; ++smp) {
        hz[smp] = static_cast<const T*>(hz_ptrs[smp * n + j]);
        kk[2 * smp] = key32[2 * (smp * n + j)];
        kk[2 * smp + 1] = key32[2 * (smp * n + j) + 1];
      }
      sqrt_power ? chunk_update<T, true, true>(x, b, g, m, d, hz.data(), kk.data(), n_samples, s, c.begin, c.end)
                 : chunk_update<T, true, false>(x, b, g, m, d, hz.data(), kk.data(), n_samples, s, c.begin, c.end);
    });
  });
}

std::string build_info() {
  return std::string("sources=") + SASSHA_STR(SASSHA_FUSED_SOURCES_HASH) + ";openmp=" +
#ifdef _OPENMP
         "1"
#else
         "0"
#endif
      ;
}

}  // namespace
}  // namespace sassha

TORCH_LIBRARY(sassha_fused, m) {
  // Global sum of ||w * v||^2 (w = |x| when adaptive) over all tensors, as a
  // 0-dim float32 tensor (float64 when acc_fp64) on the params' device.
  m.def("sq_norm(Tensor[] sources, Tensor[] params, bool adaptive, bool acc_fp64) -> Tensor");
  // backups[j] = params[j]; params[j] += sign_rho[j] / (sqrt(sq_norm) + perturb_eps[j])
  //                                     * sources[j] [* params[j]^2 when adaptive]
  m.def("perturb(Tensor(a!)[] params, Tensor[] sources, Tensor(b!)[] backups, Tensor sq_norm, "
        "float[] sign_rho, float[] perturb_eps, bool adaptive) -> ()");
  // out[j] = the Rademacher probe of the stream (keys[2j], keys[2j+1]) (probes.py)
  m.def("probes(Tensor(a!)[] out, int[] keys) -> ()");
  // The SASSHA update of every param from backups[j]; hvps[s * n + j] is H z_s
  // (None: Hz = 0) and keys[2 (s * n + j) + {0, 1}] the key of z_s, on refresh steps.
  // scalars: per param (beta1, beta2, lr, weight_decay, eps, power, 1 - beta1^t, c2).
  m.def("update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_hessian_diags, "
        "Tensor[] backups, Tensor?[] hvps, int[] keys, float[] scalars, int n_samples, bool refresh) -> ()");
  // Which sources this library was built from (see sassha_fused/_build.py).
  m.def("build_info() -> str", &sassha::build_info);
}

TORCH_LIBRARY_IMPL(sassha_fused, CPU, m) {
  m.impl("sq_norm", &sassha::sq_norm_cpu);
  m.impl("perturb", &sassha::perturb_cpu);
  m.impl("probes", &sassha::probes_cpu);
  m.impl("update", &sassha::update_cpu);
}
