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
#include <limits>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <string>
#include <vector>

#include "sassha_host.h"
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

// sources[j] of a param: the param's dtype or its math dtype, and a companion of the param.
void check_source(const char* op, const at::Tensor& v, int64_t j, const at::Tensor& p) {
  const auto st = v.scalar_type();
  TORCH_CHECK(st == p.scalar_type() || st == math_dtype(p.scalar_type()), "sassha_fused::", op, ": sources[", j,
              "] has dtype ", st, " but must be its param's dtype or its math dtype");
  check_companion(op, "sources", v, j, p, st);
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

// The chunks' partial sums added in chunk order (independent of the thread count), as a
// 0-dim float32 (float64 when acc_fp64) tensor on the params' device.
at::Tensor chunk_total(const std::vector<double>& partial, const at::Tensor& like, bool acc_fp64) {
  double total = 0;
  for (double s : partial) total += s;
  auto out = at::empty({}, like.options().dtype(acc_fp64 ? at::kDouble : at::kFloat));
  if (acc_fp64) {
    *out.mutable_data_ptr<double>() = total;
  } else {
    *out.mutable_data_ptr<float>() = static_cast<float>(total);
  }
  return out;
}

at::Tensor sq_norm_cpu(at::TensorList sources, at::TensorList params, bool adaptive, bool acc_fp64) {
  check_same_length("sq_norm", "sources", sources.size(), "params", params.size());
  TORCH_CHECK(!params.empty(), "sassha_fused::sq_norm: empty lists; the caller returns zero itself");
  const auto device = params[0].device();
  for (size_t j = 0; j < params.size(); ++j) {
    check_param("sq_norm", params[j], j, device);
    check_source("sq_norm", sources[j], j, params[j]);
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
  return chunk_total(partial, params[0], acc_fp64);
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

// ---- perturbation ----------------------------------------------------------------
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

// ---- restore (unperturb) with the finite check's squared norm -----------------------
// x = backup, bit for bit (streaming stores), and in the same sweep the sum of squares
// of v (the perturbed gradients): step()'s finite check, read while the restore runs.
// The lanes run as in chunk_sq_norm (tiles are whole lane blocks), so the partial
// sums, and the total, are those sq_norm gives.
template <typename A, typename T, typename V>
SASSHA_CPU_CLONES double chunk_restore_sq_norm(T* x, const T* backup, const V* v, int64_t begin, int64_t end) {
  static_assert(kTile % kLanes == 0, "a tile is whole lane blocks");
  A acc[kLanes] = {};
  const int64_t blocks_end = begin + (end - begin) / kLanes * kLanes;
  const V* vp = v + begin;
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    store_tile(x + t, backup + t, n);
    for (const V* stop = v + std::min(t + n, blocks_end); vp < stop; vp += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += sq_norm_term<A, false>(static_cast<A>(vp[l]), A(0));
    }
  }
  for (int64_t i = blocks_end; i < end; ++i) acc[0] += sq_norm_term<A, false>(static_cast<A>(v[i]), A(0));
  store_fence();
  double total = 0;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(acc[l]);
  return total;
}

at::Tensor restore_sq_norm_cpu(at::TensorList params, at::TensorList backups, at::TensorList sources, bool acc_fp64) {
  const size_t n = params.size();
  check_same_length("restore_sq_norm", "params", n, "backups", backups.size());
  check_same_length("restore_sq_norm", "params", n, "sources", sources.size());
  TORCH_CHECK(n > 0, "sassha_fused::restore_sq_norm: empty lists; the caller returns zero itself");
  const auto device = params[0].device();
  for (size_t j = 0; j < n; ++j) {
    check_param("restore_sq_norm", params[j], j, device);
    check_companion("restore_sq_norm", "backups", backups[j], j, params[j], params[j].scalar_type());
    check_source("restore_sq_norm", sources[j], j, params[j]);
  }
  const auto chunks = make_chunks(params);
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    dispatch_param_dtype(params[j].scalar_type(), [&](auto tag_x) {
      using T = decltype(tag_x);
      T* x = static_cast<T*>(params[j].data_ptr());
      const T* b = static_cast<const T*>(backups[j].const_data_ptr());
      dispatch_param_dtype(sources[j].scalar_type(), [&](auto tag_v) {
        using V = decltype(tag_v);
        const V* v = static_cast<const V*>(sources[j].const_data_ptr());
        partial[&c - chunks.data()] = acc_fp64 ? chunk_restore_sq_norm<double>(x, b, v, c.begin, c.end)
                                               : chunk_restore_sq_norm<float>(x, b, v, c.begin, c.end);
      });
    });
  });
  return chunk_total(partial, params[0], acc_fp64);
}

// Row g of the group table, checked.
const double* group_row(const char* op, const at::Tensor& groups, int64_t g) {
  TORCH_CHECK(g >= 0 && g < groups.size(0), "sassha_fused::", op, ": group_index ", g,
              " is outside the group table of ", groups.size(0), " rows");
  return groups.const_data_ptr<double>() + g * GroupCol::kCount;
}

void check_group_table(const char* op, const at::Tensor& groups) {
  TORCH_CHECK(groups.dim() == 2 && groups.size(1) == GroupCol::kCount && groups.scalar_type() == at::kDouble,
              "sassha_fused::", op, ": groups must be the float64 [n_groups, GroupCol.COUNT] group table "
              "(functional.GroupTable)");
}

void perturb_cpu(at::TensorList params, at::TensorList sources, at::TensorList backups, const at::Tensor& sq_norm,
                 c10::ArrayRef<int64_t> group_index, const at::Tensor& groups_table, double sign, bool adaptive) {
  const size_t n = params.size();
  check_same_length("perturb", "params", n, "sources", sources.size());
  check_same_length("perturb", "params", n, "backups", backups.size());
  check_same_length("perturb", "params", n, "group_index values", group_index.size());
  if (n == 0) return;
  const auto device = params[0].device();
  for (size_t j = 0; j < n; ++j) {
    check_param("perturb", params[j], j, device);
    check_source("perturb", sources[j], j, params[j]);
    check_companion("perturb", "backups", backups[j], j, params[j], params[j].scalar_type());
  }
  TORCH_CHECK(sq_norm.numel() == 1 && (sq_norm.scalar_type() == at::kFloat || sq_norm.scalar_type() == at::kDouble),
              "sassha_fused::perturb: sq_norm must be a one-element float32/float64 tensor (from sq_norm)");
  check_group_table("perturb", groups_table);
  const at::Tensor groups = groups_table.to(at::kCPU).contiguous();
  // The scale is computed here from the norm tensor, per tensor, as eager.py does.
  const at::Tensor norm = sq_norm.to(at::kCPU);
  const bool acc64 = norm.scalar_type() == at::kDouble;
  const double norm_value = acc64 ? *norm.const_data_ptr<double>() : static_cast<double>(*norm.const_data_ptr<float>());
  std::vector<double> scales(n);
  for (size_t j = 0; j < n; ++j) {
    const double* row = group_row("perturb", groups, group_index[j]);
    const double sign_rho = sign * row[GroupCol::kRho];
    const double peps = row[GroupCol::kPerturbEps];
    scales[j] = acc64 ? perturb_scale<double>(norm_value, sign_rho, peps)
                      : static_cast<double>(perturb_scale<float>(static_cast<float>(norm_value), sign_rho, peps));
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

// ---- probes ------------------------------------------------------------------------
ProbeKey key_of(int64_t prefix, int64_t param_index) {
  return param_key(static_cast<uint32_t>(prefix), static_cast<uint32_t>(param_index));
}


inline int64_t offset_of(c10::ArrayRef<int64_t> element_offset, int64_t j) {
  return element_offset.empty() ? 0 : element_offset[j];
}

// Whole words take a fixed-trip-count loop (vectorised); only a tensor's last
// word can be partial.
template <typename T>
SASSHA_CPU_CLONES void chunk_probes(T* z, ProbeKey key, int64_t offset, int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; w += kProbeWordBits) {
    const uint32_t bits = probe_bits_at(offset + w, key, std::min<int64_t>(end - w, kProbeWordBits));
    T* zw = z + w;
    if (end - w >= kProbeWordBits) {
      for (uint32_t b = 0; b < kProbeWordBits; ++b) zw[b] = static_cast<T>(probe_sign<float>(bits, b));
    } else {
      for (uint32_t b = 0; b < end - w; ++b) zw[b] = static_cast<T>(probe_sign<float>(bits, b));
    }
  }
}

void probes_cpu(at::TensorList out, c10::ArrayRef<int64_t> param_index, c10::ArrayRef<int64_t> element_offset,
                int64_t prefix) {
  check_same_length("probes", "tensors", out.size(), "param_index values", param_index.size());
  check_element_offsets("probes", element_offset, out);
  if (out.empty()) return;
  const auto device = out[0].device();
  for (size_t j = 0; j < out.size(); ++j) check_param("probes", out[j], j, device);
  const auto chunks = make_chunks(out);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    const ProbeKey key = key_of(prefix, param_index[j]);
    dispatch_param_dtype(out[j].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      chunk_probes<T>(static_cast<T*>(out[j].data_ptr()), key, offset_of(element_offset, j), c.begin, c.end);
    });
  });
}

// ---- finite differences ------------------------------------------------------------
double scalar_of(const char* op, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.is_floating_point(), "sassha_fused::", op, ": ", what,
              " must be a one-element floating-point tensor");
  return t.to(at::kCPU, at::kDouble).item<double>();
}

// x = base + sign * delta * z (one rounding); save = x first when asked.
template <typename T>
SASSHA_CPU_CLONES void chunk_fd_move(T* x, const T* base, T* save, ProbeKey key, int64_t offset, math_t<T> step,
                                     int64_t begin, int64_t end) {
  using M = math_t<T>;
  alignas(64) T x_new[kProbeWordBits];
  for (int64_t w = begin; w < end; w += kProbeWordBits) {
    const int64_t len = std::min<int64_t>(end - w, kProbeWordBits);
    const uint32_t bits = probe_bits_at(offset + w, key, len);
    for (int64_t b = 0; b < len; ++b) {
      x_new[b] = static_cast<T>(static_cast<M>(base[w + b]) + step * probe_sign<M>(bits, static_cast<uint32_t>(b)));
    }
    if (save != nullptr) std::memcpy(save + w, x + w, len * sizeof(T));
    std::memcpy(x + w, x_new, len * sizeof(T));
  }
}

void fd_move_cpu(at::TensorList params, at::TensorList bases, at::TensorList saves, const at::Tensor& delta,
                 c10::ArrayRef<int64_t> param_index, c10::ArrayRef<int64_t> element_offset, int64_t prefix,
                 double sign) {
  const size_t n = params.size();
  check_same_length("fd_move", "params", n, "param_index values", param_index.size());
  check_element_offsets("fd_move", element_offset, params);
  TORCH_CHECK(bases.empty() || bases.size() == n, "sassha_fused::fd_move: pass no bases (move in place) or one per param");
  TORCH_CHECK(saves.empty() || saves.size() == n, "sassha_fused::fd_move: pass no saves or one per param");
  if (n == 0) return;
  const auto device = params[0].device();
  for (size_t j = 0; j < n; ++j) {
    check_param("fd_move", params[j], j, device);
    if (!bases.empty()) check_companion("fd_move", "bases", bases[j], j, params[j], params[j].scalar_type());
    if (!saves.empty()) check_companion("fd_move", "saves", saves[j], j, params[j], params[j].scalar_type());
  }
  const double d = scalar_of("fd_move", delta, "delta");
  const auto chunks = make_chunks(params);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    const ProbeKey key = key_of(prefix, param_index[j]);
    dispatch_param_dtype(params[j].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      T* x = static_cast<T*>(params[j].data_ptr());
      const T* base = bases.empty() ? x : static_cast<const T*>(bases[j].const_data_ptr());
      T* save = saves.empty() ? nullptr : static_cast<T*>(saves[j].data_ptr());
      // sign * delta in M, as the reference multiplies the float32 delta by the sign there
      const M step = static_cast<M>(sign) * static_cast<M>(static_cast<float>(d));
      chunk_fd_move<T>(x, base, save, key, offset_of(element_offset, j), step, c.begin, c.end);
    });
  });
}

// acc = (first ? 0 : acc) + (g - baseline) * z * coefficient / delta; acc may alias g or baseline.
template <typename T, bool BASELINE>
SASSHA_CPU_CLONES void chunk_fd_fold(T* acc, const T* g, const T* baseline, ProbeKey key, int64_t offset,
                                     math_t<T> coefficient, math_t<T> delta, bool first, int64_t begin, int64_t end) {
  using M = math_t<T>;
  alignas(64) T out[kProbeWordBits];
  for (int64_t w = begin; w < end; w += kProbeWordBits) {
    const int64_t len = std::min<int64_t>(end - w, kProbeWordBits);
    const uint32_t bits = probe_bits_at(offset + w, key, len);
    for (int64_t b = 0; b < len; ++b) {
      const M base = BASELINE ? static_cast<M>(baseline[w + b]) : M(0);
      const M term = fd_term<M>(static_cast<M>(g[w + b]), base, probe_sign<M>(bits, static_cast<uint32_t>(b)),
                                coefficient, delta);
      out[b] = static_cast<T>(first ? term : static_cast<M>(acc[w + b]) + term);
    }
    std::memcpy(acc + w, out, len * sizeof(T));
  }
}

void fd_fold_cpu(at::TensorList acc, at::TensorList grads, at::TensorList baselines, const at::Tensor& delta,
                 c10::ArrayRef<int64_t> param_index, c10::ArrayRef<int64_t> element_offset, int64_t prefix,
                 double coefficient, bool first) {
  const size_t n = acc.size();
  check_same_length("fd_fold", "acc", n, "grads", grads.size());
  check_same_length("fd_fold", "acc", n, "param_index values", param_index.size());
  check_element_offsets("fd_fold", element_offset, acc);
  TORCH_CHECK(baselines.empty() || baselines.size() == n, "sassha_fused::fd_fold: pass no baselines or one per tensor");
  if (n == 0) return;
  const auto device = acc[0].device();
  for (size_t j = 0; j < n; ++j) {
    check_param("fd_fold", acc[j], j, device);
    check_companion("fd_fold", "grads", grads[j], j, acc[j], acc[j].scalar_type());
    if (!baselines.empty()) check_companion("fd_fold", "baselines", baselines[j], j, acc[j], acc[j].scalar_type());
  }
  const double d = scalar_of("fd_fold", delta, "delta");
  const auto chunks = make_chunks(acc);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    const ProbeKey key = key_of(prefix, param_index[j]);
    const int64_t offset = offset_of(element_offset, j);
    dispatch_param_dtype(acc[j].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      const M coef = static_cast<M>(coefficient);
      const M delta_m = static_cast<M>(static_cast<float>(d));
      T* a = static_cast<T*>(acc[j].data_ptr());
      const T* g = static_cast<const T*>(grads[j].const_data_ptr());
      if (baselines.empty()) {
        chunk_fd_fold<T, false>(a, g, nullptr, key, offset, coef, delta_m, first, c.begin, c.end);
      } else {
        chunk_fd_fold<T, true>(a, g, static_cast<const T*>(baselines[j].const_data_ptr()), key, offset, coef,
                               delta_m, first, c.begin, c.end);
      }
    });
  });
}

// ---- update --------------------------------------------------------------------------
// One chunk of one tensor. x_t comes from ``x_t`` (which may alias ``x``); every
// array is read once and written once. On refresh steps the probes are
// regenerated word by word from the counters, never read from memory.
template <typename T, int MODE, bool SQRT_POWER>
SASSHA_CPU_CLONES void chunk_update(T* x, const T* xt, const T* g, math_t<T>* m, math_t<T>* d, const T* const* ys,
                                    const ProbeKey* keys, int64_t n_samples, int64_t offset, math_t<T> delta,
                                    math_t<T> h_floor, const UpdateScalars<math_t<T>>& s, int64_t begin, int64_t end) {
  using M = math_t<T>;
  if (MODE == RefreshMode::kNone) {
    alignas(64) T x_new[kTile];
    alignas(64) M m_new[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t n = std::min(kTile, end - t);
      const T* bt = xt + t;
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
  // A probe word (32 elements) at a time: h, then the update into small local
  // arrays that are stored afterwards, so the compute loop only reads (x_t may
  // alias x) and vectorises; whole words have a fixed trip count.
  alignas(64) M h[kProbeWordBits];
  alignas(64) T x_new[kProbeWordBits];
  alignas(64) M m_new[kProbeWordBits];
  alignas(64) M d_new[kProbeWordBits];
  for (int64_t w = begin; w < end; w += kProbeWordBits) {
    const int64_t len = std::min<int64_t>(end - w, kProbeWordBits);
    for (int64_t b = 0; b < kProbeWordBits; ++b) h[b] = M(0);
    if (MODE == RefreshMode::kAutograd) {
      for (int64_t smp = 0; smp < n_samples; ++smp) {
        const T* hs = ys[smp];
        if (hs == nullptr) continue;  // param absent from the graph: Hz = 0
        const uint32_t bits = probe_bits_at(offset + w, keys[smp], len);
        const T* hw = hs + w;
        for (int64_t b = 0; b < len; ++b) h[b] += probe_sign<M>(bits, static_cast<uint32_t>(b)) * static_cast<M>(hw[b]);
      }
      // (a division by 1 is exact: skipped)
      if (n_samples != 1) for (int64_t b = 0; b < len; ++b) h[b] = h[b] / static_cast<M>(n_samples);
    } else if (ys[0] != nullptr) {
      const T* yw = ys[0] + w;
      if (MODE == RefreshMode::kFdDirect) {
        const uint32_t bits = probe_bits_at(offset + w, keys[0], len);
        for (int64_t b = 0; b < len; ++b) {
          h[b] = (static_cast<M>(yw[b]) - static_cast<M>(g[w + b])) * probe_sign<M>(bits, static_cast<uint32_t>(b)) / delta;
        }
      } else {
        for (int64_t b = 0; b < len; ++b) h[b] = static_cast<M>(yw[b]);
      }
    }
    if (MODE != RefreshMode::kAutograd) {
      for (int64_t b = 0; b < len; ++b) h[b] = fd_magnitude<M>(h[b], static_cast<M>(g[w + b]), h_floor);
    }
    const T* bw = xt + w;
    const T* gw = g + w;
    const M* mw = m + w;
    const M* dw = d + w;
    for (int64_t b = 0; b < len; ++b) {
      const M di = hessian_ema<M>(dw[b], h[b], s);
      M mi = mw[b];
      x_new[b] = static_cast<T>(sassha_update<M, SQRT_POWER>(static_cast<M>(bw[b]), mi, di, static_cast<M>(gw[b]), s));
      m_new[b] = mi;
      d_new[b] = di;
    }
    std::memcpy(x + w, x_new, len * sizeof(T));
    std::memcpy(m + w, m_new, len * sizeof(M));
    std::memcpy(d + w, d_new, len * sizeof(M));
  }
}

template <typename T, int MODE>
void update_chunk_dispatch(bool sqrt_power, T* x, const T* xt, const T* g, math_t<T>* m, math_t<T>* d,
                           const T* const* ys, const ProbeKey* keys, int64_t n_samples, int64_t offset,
                           math_t<T> delta, math_t<T> h_floor, const UpdateScalars<math_t<T>>& s, const Chunk& c) {
  if (sqrt_power) {
    chunk_update<T, MODE, true>(x, xt, g, m, d, ys, keys, n_samples, offset, delta, h_floor, s, c.begin, c.end);
  } else {
    chunk_update<T, MODE, false>(x, xt, g, m, d, ys, keys, n_samples, offset, delta, h_floor, s, c.begin, c.end);
  }
}

// ---- update with compact state (state_bits 16 / 8) or master weights -------------------
// One pass per group of kGroup = 32 elements (one probe word; a chunk is a whole number
// of groups, and groups start at the tensor's element 0): decode the state (codes and the
// group's scale), compute, take the group's maximum of the new values, encode, store.
// The per-element encodings are sassha_math.h's, shared with the CUDA kernels. With 8-bit
// state every per-element operation is a product, a sum or a conversion except the
// update's own division m_t / (pre + eps) and the square root of m's companding; the
// divisions by a group's scale are one reciprocal per group (m) or one division per
// group (s / c2 of the preconditioner), and the D encoding's division per element is
// paid on refresh steps only. Every loop over a group has a fixed trip count and no
// branch per element (selects, integer min / max), so it vectorises.

// The state's element types by state_bits (32: the math dtype).
template <typename T, int SB>
using m_state_t = std::conditional_t<SB == 8, int8_t, std::conditional_t<SB == 16, c10::BFloat16, math_t<T>>>;
template <typename T, int SB>
using d_state_t = std::conditional_t<SB == 8, uint8_t, std::conditional_t<SB == 16, c10::BFloat16, math_t<T>>>;
template <int MW>
using correction_t = std::conditional_t<MW == 24, int8_t, int16_t>;

// What one tensor's compact update reads besides the scalars.
template <typename T>
struct CompactArgs {
  T* x;
  const T* xt;
  const T* g;
  void* m;         // m_state_t
  void* d;         // d_state_t
  float* m_scales;  // state_bits 8 only
  float* d_scales;
  void* correction;  // correction_t, MW != 0 only
  int mode;          // RefreshMode (runtime: one branch per word)
  const T* const* ys;
  const ProbeKey* keys;
  int64_t n_samples;
  int64_t offset;
  math_t<T> delta;
  math_t<T> h_floor;
};

// h of the word at element w (len elements), as chunk_update computes it.
template <typename T>
SASSHA_ALWAYS_INLINE inline void word_h(const CompactArgs<T>& a, int64_t w, int64_t len, math_t<T>* h) {
  using M = math_t<T>;
  for (int64_t b = 0; b < kProbeWordBits; ++b) h[b] = M(0);
  if (a.mode == RefreshMode::kAutograd) {
    for (int64_t smp = 0; smp < a.n_samples; ++smp) {
      const T* hs = a.ys[smp];
      if (hs == nullptr) continue;  // param absent from the graph: Hz = 0
      const uint32_t bits = probe_bits_at(a.offset + w, a.keys[smp], len);
      const T* hw = hs + w;
      for (int64_t b = 0; b < len; ++b) h[b] += probe_sign<M>(bits, static_cast<uint32_t>(b)) * static_cast<M>(hw[b]);
    }
    // (a division by 1 is exact: skipped)
    if (a.n_samples != 1) for (int64_t b = 0; b < len; ++b) h[b] = h[b] / static_cast<M>(a.n_samples);
    return;
  }
  if (a.ys[0] != nullptr) {
    const T* yw = a.ys[0] + w;
    if (a.mode == RefreshMode::kFdDirect) {
      const uint32_t bits = probe_bits_at(a.offset + w, a.keys[0], len);
      for (int64_t b = 0; b < len; ++b) {
        h[b] = (static_cast<M>(yw[b]) - static_cast<M>(a.g[w + b])) * probe_sign<M>(bits, static_cast<uint32_t>(b)) /
               a.delta;
      }
    } else {
      for (int64_t b = 0; b < len; ++b) h[b] = static_cast<M>(yw[b]);
    }
  }
  for (int64_t b = 0; b < len; ++b) h[b] = fd_magnitude<M>(h[b], static_cast<M>(a.g[w + b]), a.h_floor);
}

// The group's scale: max |v| (ABS) or max v over the 32 values (zero-padded past the
// tensor's end, as encoding.py pads; a NaN makes it NaN, as torch's amax). A tree of
// elementwise maxima and a separate NaN test: both vectorise (a NaN-propagating
// running maximum compiles to a compare-and-branch per element). The loops stay loops
// (unroll 1): fully unrolled, GCC turned the tree and the loops around it (the group's
// encoding) into scalar pieces put together through general registers, which made
// the 8-bit refresh update about 1.6x slower.
template <bool ABS>
SASSHA_ALWAYS_INLINE inline float group_max(const float* v) {
  static_assert(kGroup == 32, "the tree below halves 32 values");
  alignas(64) float t[16];
  int32_t nan = 0;
#pragma GCC unroll 1
  for (int l = 0; l < kGroup; ++l) nan |= static_cast<int32_t>(v[l] != v[l]);
#pragma GCC unroll 1
  for (int l = 0; l < 16; ++l) {
    const float a = ABS ? std::fabs(v[l]) : v[l];
    const float b = ABS ? std::fabs(v[l + 16]) : v[l + 16];
    t[l] = a > b ? a : b;
  }
#pragma GCC unroll 1
  for (int l = 0; l < 8; ++l) t[l] = t[l] > t[l + 8] ? t[l] : t[l + 8];
#pragma GCC unroll 1
  for (int l = 0; l < 4; ++l) t[l] = t[l] > t[l + 4] ? t[l] : t[l + 4];
#pragma GCC unroll 1
  for (int l = 0; l < 2; ++l) t[l] = t[l] > t[l + 2] ? t[l] : t[l + 2];
  float s = t[0] > t[1] ? t[0] : t[1];
  s = s > 0.f ? s : 0.f;  // the padding's zeros (the values are >= 0 anyway)
  return nan != 0 ? std::numeric_limits<float>::quiet_NaN() : s;
}

// One group of the compact update: elements [w, w + len) of group grp. FULL: len is
// kGroup (every group but a tensor's last), so every loop has a fixed trip count and
// vectorises whole. With 8-bit state:
//  * no refresh, sqrt power: the preconditioner sqrt(D) / c2 straight from the codes,
//    (q * (1/255)) * (s / c2) with s / c2 once per group (encoding.hessian_root, as
//    eager.preconditioner), in float32 whatever the math dtype; D is not decoded at all;
//  * refresh: R = sqrt(D_t) of the float32 D_t is taken once: the encoding's root and,
//    for float32 math with the sqrt power, the update's sqrt (the same correctly rounded
//    sqrt of the same float);
//  * m is decoded by products (t |t|) s and encoded with one reciprocal per group.
template <typename T, bool REFRESH, bool SQRT_POWER, int SB, int MW, bool FULL>
SASSHA_ALWAYS_INLINE inline void update_group(const CompactArgs<T>& a, const UpdateScalars<math_t<T>>& s, int64_t w,
                                              int64_t len_arg) {
  using M = math_t<T>;
  using MS = m_state_t<T, SB>;
  using DS = d_state_t<T, SB>;
  using C = correction_t<MW>;
  // the preconditioner from the codes (no refresh, sqrt power, 8 bits)
  constexpr bool kFromCodes = SB == 8 && !REFRESH && SQRT_POWER;
  // the update's sqrt(D_t) is the encoding's root (refresh, sqrt power, 8 bits, float32 math)
  constexpr bool kSharedRoot = SB == 8 && REFRESH && SQRT_POWER && std::is_same_v<M, float>;
  const int64_t len = FULL ? kGroup : len_arg;
  const int64_t grp = w / kGroup;
  const T* xw = a.xt + w;
  const T* gw = a.g + w;
  const MS* mw = static_cast<const MS*>(a.m) + w;
  const DS* dw = static_cast<const DS*>(a.d) + w;
  const C* cw = static_cast<const C*>(a.correction) + w;
  alignas(64) M h[kGroup];
  alignas(64) M m_new[kGroup];     // m_t (16 bits)
  alignas(64) M d_new[kGroup];     // D_t (refresh steps)
  // what the 8-bit encodings read, zero-padded past a tensor's end: the float32 m_t, D_t and
  // sqrt(D_t). Written where they are computed, by the same vector stores the encodings then
  // read: a copy between arrays was done with 16-byte moves, read back by 32-byte loads that
  // could not be forwarded from them (a stall of a quarter of the 8-bit update's time).
  alignas(64) float mf[kGroup];
  alignas(64) float v[kGroup];
  alignas(64) float root[kGroup];
  alignas(64) T x_new[kGroup];
  alignas(64) C c_new[kGroup];
  alignas(64) MS m_out[kGroup];
  alignas(64) DS d_out[kGroup];
  if constexpr (REFRESH) word_h<T>(a, w, len, h);
  float m_scale = 0.f, d_scale = 0.f, pre_scale = 0.f;
  if constexpr (SB == 8) {
    m_scale = a.m_scales[grp];
    d_scale = a.d_scales[grp];
    // s / c2 in float32, c2 rounded to float32 (eager.preconditioner): once per group
    if constexpr (kFromCodes) pre_scale = d_scale / static_cast<float>(s.c2);
  }
  MS* m_dst = static_cast<MS*>(a.m) + w;
  DS* d_dst = static_cast<DS*>(a.d) + w;
  // D_t first, in a loop of its own (refresh steps), and stored: with 8 bits encoded here,
  // so the update below takes sqrt(D_t) from the array the encoding just read,
  // and reads no D code after they are overwritten.
  if constexpr (REFRESH) {
    for (int64_t b = 0; b < len; ++b) {
      M di;
      if constexpr (SB == 8) {
        di = static_cast<M>(decode_d(static_cast<int32_t>(dw[b]), d_scale));
      } else {
        di = static_cast<M>(dw[b]);
      }
      di = hessian_ema<M>(di, h[b], s);
      d_new[b] = di;
      if constexpr (SB == 8) {
        v[b] = static_cast<float>(di);
        root[b] = std::sqrt(v[b]);
      }
    }
    if constexpr (SB == 8) {
      if constexpr (!FULL) {
        for (int64_t b = len; b < kGroup; ++b) v[b] = root[b] = 0.f;
      }
      const float ds = group_max<false>(root);
      for (int64_t b = 0; b < kGroup; ++b) d_out[b] = encode_d(v[b], root[b], ds);
      a.d_scales[grp] = ds;
      std::memcpy(d_dst, d_out, len * sizeof(DS));
    } else {
      for (int64_t b = 0; b < len; ++b) d_out[b] = static_cast<DS>(d_new[b]);  // 16: bfloat16, nearest even
      std::memcpy(d_dst, d_out, len * sizeof(DS));
    }
  }
  for (int64_t b = 0; b < len; ++b) {
    M mi, pre;
    if constexpr (SB == 8) {
      mi = static_cast<M>(decode_m(static_cast<int32_t>(mw[b]), m_scale));
    } else {
      mi = static_cast<M>(mw[b]);
    }
    if constexpr (kFromCodes) {
      pre = static_cast<M>(hessian_root(static_cast<int32_t>(dw[b]), pre_scale));
    } else if constexpr (kSharedRoot) {
      pre = root[b] / s.c2;
    } else {
      M di;
      if constexpr (REFRESH) {
        di = d_new[b];
      } else if constexpr (SB == 8) {
        di = static_cast<M>(decode_d(static_cast<int32_t>(dw[b]), d_scale));
      } else {
        di = static_cast<M>(dw[b]);
      }
      pre = hessian_power<M, SQRT_POWER>(di, s.power) / s.c2;
    }
    M x0;
    if constexpr (MW != 0) {
      x0 = join_master<MW>(xw[b].x, static_cast<int32_t>(cw[b]));
    } else {
      x0 = static_cast<M>(xw[b]);
    }
    const M xn = sassha_update_pre<M>(x0, mi, pre, static_cast<M>(gw[b]), s);
    if constexpr (MW != 0) {
      uint16_t bits;
      int32_t rest;
      split_master<MW>(xn, bits, rest);
      x_new[b] = c10::BFloat16(bits, c10::BFloat16::from_bits());
      c_new[b] = static_cast<C>(rest);
    } else {
      x_new[b] = static_cast<T>(xn);
    }
    if constexpr (SB == 8) {
      mf[b] = static_cast<float>(mi);
    } else {
      m_new[b] = mi;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    store_tile(a.x + w, x_new, len);
  } else {
    std::memcpy(a.x + w, x_new, len * sizeof(T));
  }
  if constexpr (MW != 0) std::memcpy(static_cast<C*>(a.correction) + w, c_new, len * sizeof(C));
  if constexpr (SB == 8) {
    if constexpr (!FULL) {
      for (int64_t b = len; b < kGroup; ++b) mf[b] = 0.f;
    }
    const float ms = group_max<true>(mf);
    const float mr = m_scale_reciprocal(ms);  // once per group
    for (int64_t b = 0; b < kGroup; ++b) m_out[b] = encode_m(mf[b], mr);
    a.m_scales[grp] = ms;
  } else {
    for (int64_t b = 0; b < len; ++b) m_out[b] = static_cast<MS>(m_new[b]);  // 16: bfloat16, nearest even
  }
  std::memcpy(m_dst, m_out, len * sizeof(MS));
}

template <typename T, bool REFRESH, bool SQRT_POWER, int SB, int MW>
SASSHA_CPU_CLONES void chunk_update_compact(const CompactArgs<T>& args, const UpdateScalars<math_t<T>>& s,
                                            int64_t begin, int64_t end) {
  static_assert(MW == 0 || std::is_same_v<T, c10::BFloat16>, "master weights are for bfloat16 params");
  const CompactArgs<T> a = args;  // by value: the compiler knows nothing below writes it
  int64_t w = begin;
  for (; w + kGroup <= end; w += kGroup) update_group<T, REFRESH, SQRT_POWER, SB, MW, true>(a, s, w, kGroup);
  if (w < end) update_group<T, REFRESH, SQRT_POWER, SB, MW, false>(a, s, w, end - w);
  if constexpr (std::is_same_v<T, float>) store_fence();
}

template <typename T, int SB, int MW>
void compact_dispatch(bool refresh, bool sqrt_power, const CompactArgs<T>& a, const UpdateScalars<math_t<T>>& s,
                      const Chunk& c) {
  if (refresh) {
    if (sqrt_power) chunk_update_compact<T, true, true, SB, MW>(a, s, c.begin, c.end);
    else chunk_update_compact<T, true, false, SB, MW>(a, s, c.begin, c.end);
  } else {
    if (sqrt_power) chunk_update_compact<T, false, true, SB, MW>(a, s, c.begin, c.end);
    else chunk_update_compact<T, false, false, SB, MW>(a, s, c.begin, c.end);
  }
}

template <typename T, int SB>
void compact_dispatch_master(int master_bits, bool refresh, bool sqrt_power, const CompactArgs<T>& a,
                             const UpdateScalars<math_t<T>>& s, const Chunk& c) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (master_bits == 24) return compact_dispatch<T, SB, 24>(refresh, sqrt_power, a, s, c);
    if (master_bits == 32) return compact_dispatch<T, SB, 32>(refresh, sqrt_power, a, s, c);
  }
  compact_dispatch<T, SB, 0>(refresh, sqrt_power, a, s, c);
}

// The optimizer state of param j in the encoding of state_bits (see sassha_fused/encoding.py).
void check_state(const char* op, const char* what, const at::Tensor& t, int64_t j, const at::Tensor& p,
                 int64_t state_bits, at::ScalarType expected) {
  TORCH_CHECK(t.defined(), "sassha_fused::", op, ": ", what, "[", j, "] is undefined");
  TORCH_CHECK(t.device() == p.device(), "sassha_fused::", op, ": ", what, "[", j, "] is on ", t.device(),
              " but its param is on ", p.device(), "; keep each parameter's tensors on its device");
  TORCH_CHECK(t.scalar_type() == expected, "sassha_fused::", op, ": ", what, "[", j, "] has dtype ", t.scalar_type(),
              " but ", expected, " is expected for a ", p.scalar_type(), " parameter with state_bits=", state_bits,
              " (32: the math dtype, so 16-bit params keep float32 optimizer state; 16: bfloat16; "
              "8: int8 codes of m and uint8 codes of D, with float32 scales)");
  TORCH_CHECK(t.numel() == p.numel(), "sassha_fused::", op, ": ", what, "[", j, "] has ", t.numel(),
              " elements but its param has ", p.numel(), "; shapes must match");
  TORCH_CHECK(t.is_contiguous(), "sassha_fused::", op, ": ", what, "[", j, "] is not contiguous; pass contiguous tensors");
}

// The float32 group scales of param j (state_bits 8): encoding.n_groups(numel) of them.
void check_scales(const char* op, const char* what, const at::Tensor& t, int64_t j, const at::Tensor& p) {
  TORCH_CHECK(t.defined() && t.device() == p.device() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "sassha_fused::", op, ": ", what, "[", j, "] must be a contiguous float32 tensor on its param's "
              "device (one scale per group of 32 elements)");
  TORCH_CHECK(t.numel() == n_groups(p.numel()), "sassha_fused::", op, ": ", what, "[", j, "] has ", t.numel(),
              " scales but its param of ", p.numel(), " elements needs ", n_groups(p.numel()),
              " (one per group of 32 elements, encoding.n_groups)");
}

// The master correction of param j (master_weight_bits), or none: 24 for int8, 32 for
// int16, 0 for none.
int check_correction(const char* op, const std::optional<at::Tensor>& t, int64_t j, const at::Tensor& p) {
  if (!t.has_value() || !t->defined()) return 0;
  TORCH_CHECK(p.scalar_type() == at::kBFloat16, "sassha_fused::", op, ": master_corrections[", j,
              "] is given for a ", p.scalar_type(), " parameter; master weights are for bfloat16 parameters "
              "(pass None for the others)");
  TORCH_CHECK(t->scalar_type() == at::kChar || t->scalar_type() == at::kShort, "sassha_fused::", op,
              ": master_corrections[", j, "] has dtype ", t->scalar_type(),
              "; expected int8 (master_weight_bits=24) or int16 (master_weight_bits=32)");
  TORCH_CHECK(t->device() == p.device() && t->numel() == p.numel() && t->is_contiguous(), "sassha_fused::", op,
              ": master_corrections[", j, "] must be a contiguous tensor of its param's ", p.numel(),
              " elements on its device");
  return t->scalar_type() == at::kChar ? 24 : 32;
}

void update_cpu(at::TensorList params, at::TensorList x_t, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_hessian_diags, at::TensorList exp_avg_scales,
                at::TensorList exp_hessian_diag_scales, const c10::List<std::optional<at::Tensor>>& master_corrections,
                int64_t state_bits, const at::Tensor& scalars, double power, int64_t refresh_mode,
                const c10::List<std::optional<at::Tensor>>& ys, c10::ArrayRef<int64_t> param_index,
                c10::ArrayRef<int64_t> element_offset, c10::ArrayRef<int64_t> prefixes,
                const std::optional<at::Tensor>& fd) {
  const size_t n = params.size();
  check_same_length("update", "params", n, "x_t", x_t.size());
  check_same_length("update", "params", n, "grads", grads.size());
  check_same_length("update", "params", n, "exp_avgs", exp_avgs.size());
  check_same_length("update", "params", n, "exp_hessian_diags", exp_hessian_diags.size());
  check_same_length("update", "params", n, "param_index values", param_index.size());
  check_element_offsets("update", element_offset, params);
  TORCH_CHECK(state_bits == 32 || state_bits == 16 || state_bits == 8,
              "sassha_fused::update: state_bits must be 32, 16 or 8, got ", state_bits);
  if (state_bits == 8) {
    check_same_length("update", "params", n, "exp_avg_scales", exp_avg_scales.size());
    check_same_length("update", "params", n, "exp_hessian_diag_scales", exp_hessian_diag_scales.size());
  } else {
    TORCH_CHECK(exp_avg_scales.empty() && exp_hessian_diag_scales.empty(), "sassha_fused::update: scales are "
                "for state_bits=8 only; pass empty exp_avg_scales and exp_hessian_diag_scales with state_bits=",
                state_bits);
  }
  TORCH_CHECK(master_corrections.empty() || master_corrections.size() == n, "sassha_fused::update: got ",
              master_corrections.size(), " master_corrections for ", n,
              " params; pass one per param (None where a param has none) or an empty list (no master weights)");
  TORCH_CHECK(refresh_mode >= RefreshMode::kNone && refresh_mode <= RefreshMode::kPrecomputed,
              "sassha_fused::update: unknown refresh_mode ", refresh_mode);
  TORCH_CHECK(scalars.dim() == 2 && scalars.size(0) == static_cast<int64_t>(n) &&
                  scalars.size(1) == UpdateCol::kCount && scalars.scalar_type() == at::kDouble,
              "sassha_fused::update: scalars must be a float64 [n_params, UpdateCol.COUNT] table "
              "(functional.update_scalars)");
  const bool refresh = refresh_mode != RefreshMode::kNone;
  const int64_t n_samples = static_cast<int64_t>(prefixes.size());
  if (refresh) {
    TORCH_CHECK(n_samples >= 1 && ys.size() == static_cast<size_t>(n_samples) * n, "sassha_fused::update: got ",
                ys.size(), " ys for ", n_samples, " samples x ", n, " params; pass ys[s * n_params + j] (None: 0)");
    TORCH_CHECK(refresh_mode == RefreshMode::kAutograd || n_samples == 1,
                "sassha_fused::update: finite-difference refresh modes take one list of ys (one prefix)");
    TORCH_CHECK(refresh_mode == RefreshMode::kAutograd ||
                    (fd.has_value() && fd->numel() == 2 && fd->scalar_type() == at::kFloat),
                "sassha_fused::update: finite-difference modes need fd = [delta, h_floor] (float32)");
  }
  if (n == 0) return;
  const auto device = params[0].device();
  std::vector<const void*> y_ptrs(refresh ? ys.size() : 0, nullptr);
  std::vector<int> master_bits(n, 0);
  std::vector<void*> corr_ptrs(n, nullptr);
  for (size_t j = 0; j < n; ++j) {
    const auto& p = params[j];
    const auto pt = p.scalar_type();
    check_param("update", p, j, device);
    check_companion("update", "grads", grads[j], j, p, pt);
    check_companion("update", "x_t", x_t[j], j, p, pt);
    const at::ScalarType m_dtype = state_bits == 32 ? math_dtype(pt) : state_bits == 16 ? at::kBFloat16 : at::kChar;
    const at::ScalarType d_dtype = state_bits == 32 ? math_dtype(pt) : state_bits == 16 ? at::kBFloat16 : at::kByte;
    check_state("update", "exp_avgs", exp_avgs[j], j, p, state_bits, m_dtype);
    check_state("update", "exp_hessian_diags", exp_hessian_diags[j], j, p, state_bits, d_dtype);
    if (state_bits == 8) {
      check_scales("update", "exp_avg_scales", exp_avg_scales[j], j, p);
      check_scales("update", "exp_hessian_diag_scales", exp_hessian_diag_scales[j], j, p);
    }
    if (!master_corrections.empty()) {
      const std::optional<at::Tensor> corr = master_corrections[j];
      master_bits[j] = check_correction("update", corr, j, p);
      if (master_bits[j] != 0) corr_ptrs[j] = corr->data_ptr();
    }
  }
  for (size_t k = 0; k < y_ptrs.size(); ++k) {
    const std::optional<at::Tensor> y = ys[k];
    const size_t j = k % n;
    if (y.has_value() && y->defined()) {
      check_companion("update", "ys", *y, static_cast<int64_t>(k), params[j], params[j].scalar_type());
      y_ptrs[k] = y->const_data_ptr();
    }
  }
  const at::Tensor table = scalars.to(at::kCPU).contiguous();
  const double* rows = table.const_data_ptr<double>();
  float fd_host[2] = {1.f, 0.f};
  if (refresh && refresh_mode != RefreshMode::kAutograd) {
    const at::Tensor f = fd->to(at::kCPU).contiguous();
    fd_host[0] = f.const_data_ptr<float>()[0];
    fd_host[1] = f.const_data_ptr<float>()[1];
  }
  const bool sqrt_power = power == 0.5;
  const auto chunks = make_chunks(params);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const int64_t j = c.tensor;
    dispatch_param_dtype(params[j].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      const auto s = update_scalars<M>(rows + j * UpdateCol::kCount, power);
      T* x = static_cast<T*>(params[j].data_ptr());
      const T* xt = static_cast<const T*>(x_t[j].const_data_ptr());
      if (!s.live) {  // restore x_t, leave the state alone
        if (xt != x) std::memcpy(x + c.begin, xt + c.begin, (c.end - c.begin) * sizeof(T));
        return;
      }
      const T* g = static_cast<const T*>(grads[j].const_data_ptr());
      const M delta_m = static_cast<M>(fd_host[0]);
      const M floor_m = static_cast<M>(fd_host[1]);
      const int64_t offset = offset_of(element_offset, j);
      std::vector<const T*> yj(refresh ? n_samples : 0);
      std::vector<ProbeKey> kj(refresh ? n_samples : 0);
      for (int64_t smp = 0; smp < static_cast<int64_t>(yj.size()); ++smp) {
        yj[smp] = static_cast<const T*>(y_ptrs[smp * n + j]);
        kj[smp] = key_of(prefixes[smp], param_index[j]);
      }
      if (state_bits != 32 || master_bits[j] != 0) {  // compact state or master weights
        CompactArgs<T> a{x, xt, g, exp_avgs[j].data_ptr(), exp_hessian_diags[j].data_ptr(),
                         state_bits == 8 ? exp_avg_scales[j].data_ptr<float>() : nullptr,
                         state_bits == 8 ? exp_hessian_diag_scales[j].data_ptr<float>() : nullptr,
                         corr_ptrs[j], static_cast<int>(refresh_mode), yj.data(), kj.data(), n_samples, offset,
                         delta_m, floor_m};
        switch (state_bits) {
          case 8: compact_dispatch_master<T, 8>(master_bits[j], refresh, sqrt_power, a, s, c); break;
          case 16: compact_dispatch_master<T, 16>(master_bits[j], refresh, sqrt_power, a, s, c); break;
          default: compact_dispatch_master<T, 32>(master_bits[j], refresh, sqrt_power, a, s, c);
        }
        return;
      }
      M* m = static_cast<M*>(exp_avgs[j].data_ptr());
      M* dd = static_cast<M*>(exp_hessian_diags[j].data_ptr());
      switch (refresh_mode) {
        case RefreshMode::kNone:
          update_chunk_dispatch<T, RefreshMode::kNone>(sqrt_power, x, xt, g, m, dd, nullptr, nullptr, 0, offset,
                                                       delta_m, floor_m, s, c);
          break;
        case RefreshMode::kAutograd:
          update_chunk_dispatch<T, RefreshMode::kAutograd>(sqrt_power, x, xt, g, m, dd, yj.data(), kj.data(),
                                                           n_samples, offset, delta_m, floor_m, s, c);
          break;
        case RefreshMode::kFdDirect:
          update_chunk_dispatch<T, RefreshMode::kFdDirect>(sqrt_power, x, xt, g, m, dd, yj.data(), kj.data(),
                                                           n_samples, offset, delta_m, floor_m, s, c);
          break;
        default:
          update_chunk_dispatch<T, RefreshMode::kPrecomputed>(sqrt_power, x, xt, g, m, dd, yj.data(), kj.data(),
                                                              n_samples, offset, delta_m, floor_m, s, c);
      }
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
  // backups[j] = params[j]; params[j] += sign * rho / (sqrt(sq_norm) + perturb_eps)
  //                                     * sources[j] [* params[j]^2 when adaptive]
  // with rho, perturb_eps from row group_index[j] of the float64 group table (GroupCol).
  m.def("perturb(Tensor(a!)[] params, Tensor[] sources, Tensor(b!)[] backups, Tensor sq_norm, int[] group_index, "
        "Tensor groups, float sign, bool adaptive) -> ()");
  // out[j] = the Rademacher probe of parameter param_index[j] (probes.py), from the
  // probe vector's key prefix. element_offset[j]: the global element of out[j]'s first
  // element (a shard of a larger tensor, FSDP2): local element i draws the probe of
  // element element_offset[j] + i. Every op below takes it the same way; [] means 0.
  m.def("probes(Tensor(a!)[] out, int[] param_index, int[] element_offset, int prefix) -> ()");
  // saves[j] = params[j] (if given); params[j] = (bases[j] or params[j]) + sign * delta * z_j
  m.def("fd_move(Tensor(a!)[] params, Tensor[] bases, Tensor(b!)[] saves, Tensor delta, int[] param_index, "
        "int[] element_offset, int prefix, float sign) -> ()");
  // acc[j] = (first ? 0 : acc[j]) + (grads[j] - baselines[j]) * z_j * coefficient / delta
  m.def("fd_fold(Tensor(a!)[] acc, Tensor[] grads, Tensor[] baselines, Tensor delta, int[] param_index, "
        "int[] element_offset, int prefix, float coefficient, bool first) -> ()");
  // The SASSHA update of every param from x_t[j] (which may be params[j]); scalars is
  // the float64 [n, UpdateCol.COUNT] table of functional.update_scalars; on refresh
  // steps ys[s * n + j] (None: 0) and the probe prefixes per sample (RefreshMode);
  // fd = [delta, h_floor] (float32) in the finite-difference modes.
  // The state is encoded as state_bits says (sassha_fused/encoding.py): 32: m and D in the
  // math dtype; 16: bfloat16; 8: int8 / uint8 codes with one float32 scale per group of 32
  // elements in exp_avg_scales / exp_hessian_diag_scales (empty lists otherwise). D is
  // written on refresh steps only. master_corrections (empty: none; else one per param,
  // None for a param without one): the int8 (24) / int16 (32) low bits of a bfloat16
  // param's float32 master weight; the update starts from the joined master and writes
  // both halves. A param that is not live goes back to x_t and no state is written.
  m.def("update(Tensor(a!)[] params, Tensor[] x_t, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_hessian_diags, Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_hessian_diag_scales, "
        "Tensor(f!)?[] master_corrections, int state_bits, Tensor scalars, float power, int refresh_mode, "
        "Tensor?[] ys, int[] param_index, int[] element_offset, int[] prefixes, Tensor? fd) -> ()");
  // params[j] = backups[j] (bit for bit); returns the sum of ||sources[j]||^2 over all
  // tensors, as sq_norm does (unperturb()'s restore with step()'s finite check).
  m.def("restore_sq_norm(Tensor(a!)[] params, Tensor[] backups, Tensor[] sources, bool acc_fp64) -> Tensor");
  // Which sources this library was built from (see sassha_fused/_build.py).
  m.def("build_info() -> str", &sassha::build_info);
}

TORCH_LIBRARY_IMPL(sassha_fused, CPU, m) {
  m.impl("sq_norm", &sassha::sq_norm_cpu);
  m.impl("restore_sq_norm", &sassha::restore_sq_norm_cpu);
  m.impl("perturb", &sassha::perturb_cpu);
  m.impl("probes", &sassha::probes_cpu);
  m.impl("fd_move", &sassha::fd_move_cpu);
  m.impl("fd_fold", &sassha::fd_fold_cpu);
  m.impl("update", &sassha::update_cpu);
}
