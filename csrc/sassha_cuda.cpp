// CUDA implementations of the sassha_fused operators (schemas in sassha_ops.cpp):
// argument checks, the per-launch tables, and calls into sassha_cuda_kernels.cu.
// Compiled only when torch has CUDA and nvcc is present.
//
// Tables. Each call describes its tensors as TensorRecs (pointers, sizes, dtype,
// alignment, probe counter and element offset, group); the records and the block
// map built from their sizes go to the device once and are reused (TableCache): the
// block map is keyed on the sizes, the records on their bytes, so a change of storage
// (or of gradients' addresses) uploads the records alone and an unchanged call uploads
// nothing. Both caches are bounded. Per-step
// values come as device tensors (the group and update-scalar tables, delta); the
// refresh inputs and probe prefixes of a refresh step travel in one small pinned,
// non-blocking copy. The host never waits for the device.
//
// CUDA graph capture. No pinned memory is allocated while the current stream
// captures (PyTorch builds whose caching host allocator is not capture-safe fail
// there). Each records table uploaded outside a capture gets a pinned spare of its
// size; records that are new inside a capture (gradients in the graph's pool) are
// written into a spare of their size prepared before it, and that spare is the
// graph's from then on. A block map or records table with no spare left raises,
// asking for an eager warm-up step; refresh steps cannot be captured (they raise).
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "sassha_cuda.h"
#include "sassha_host.h"
#include "sassha_math.h"

namespace sassha {
namespace cuda {
namespace {

int32_t dtype_code(const at::Tensor& t, const char* op, int64_t j) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK(false, "sassha_fused::", op, " (CUDA): tensor ", j, " has dtype ", t.scalar_type(),
                  "; the CUDA kernels take float32, bfloat16 and float16 (use the 'foreach' backend "
                  "for float64)");
  }
  return -1;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t offset_of(c10::ArrayRef<int64_t> element_offset, size_t j) {
  return element_offset.empty() ? 0 : element_offset[j];
}

void check_tensor(const char* op, const char* what, const at::Tensor& t, int64_t j, const at::Tensor& p,
                  at::ScalarType expected) {
  TORCH_CHECK(t.defined(), "sassha_fused::", op, ": ", what, "[", j, "] is undefined");
  TORCH_CHECK(t.device() == p.device(), "sassha_fused::", op, ": ", what, "[", j, "] is on ", t.device(),
              " but its param is on ", p.device(), "; keep each parameter's tensors on one device");
  TORCH_CHECK(t.scalar_type() == expected, "sassha_fused::", op, ": ", what, "[", j, "] has dtype ",
              t.scalar_type(), " but ", expected, " is expected (state_bits=32: 16-bit params keep float32 state; "
              "16: bfloat16; 8: int8 / uint8 codes)");
  TORCH_CHECK(t.numel() == p.numel(), "sassha_fused::", op, ": ", what, "[", j, "] has ", t.numel(),
              " elements but its param has ", p.numel());
  TORCH_CHECK(t.is_contiguous(), "sassha_fused::", op, ": ", what, "[", j, "] is not contiguous; pass contiguous tensors");
}

void check_params(const char* op, at::TensorList params) {
  TORCH_CHECK(!params.empty(), "sassha_fused::", op, ": empty tensor list");
  const auto device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "sassha_fused::", op, " (CUDA): params[0] is on ", device);
  for (size_t j = 0; j < params.size(); ++j) {
    TORCH_CHECK(params[j].device() == device, "sassha_fused::", op, ": params[", j, "] is on ", params[j].device(),
                " but params[0] is on ", device, "; call the op once per device");
    TORCH_CHECK(params[j].is_contiguous(), "sassha_fused::", op, ": params[", j, "] is not contiguous");
    TORCH_CHECK(params[j].numel() / kBlockElems < (int64_t(1) << 31),
                "sassha_fused::", op, ": params[", j, "] is too large for one launch");
    dtype_code(params[j], op, j);
  }
}

TensorRec make_rec(const at::Tensor& x, int64_t j, const char* op) {
  TensorRec r;
  std::memset(&r, 0, sizeof(r));
  r.x = x.data_ptr();
  r.numel = x.numel();
  r.dtype = dtype_code(x, op, j);
  return r;
}

void finish_rec(TensorRec& r) {
  // the scales are read and written one float at a time: any alignment
  r.aligned = aligned16(r.x) && aligned16(r.src) && aligned16(r.aux) && aligned16(r.m) && aligned16(r.d) &&
              aligned16(r.corr);
}

// What a launch reads: the call's records and the block map of its tensors' sizes.
struct DeviceTables {
  const TensorRec* recs = nullptr;
  const BlockRec* blocks = nullptr;
  int64_t n_blocks = 0;
};

size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

bool capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status);
  return status != cudaStreamCaptureStatusNone;
}

const char* const kWarmUp =
    "no pinned host memory can be allocated while a stream captures a CUDA graph; run one eager step with the "
    "same parameters (a plain, non-refresh step, like the one captured) before capturing: the warm-up "
    "torch.cuda.graph's documentation asks for. Its uploads prepare every buffer a captured step copies from";

at::Tensor pinned_bytes(size_t n) {
  return at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
}

// ``bytes`` into the pinned buffer ``pinned`` and on to the device, without waiting.
at::Tensor copy_up(const void* bytes, size_t n, const at::Tensor& pinned, const at::Device& device) {
  std::memcpy(pinned.data_ptr(), bytes, n);
  return pinned.to(device, /*non_blocking=*/true);
}

// Host bytes to the device through a new pinned buffer, without waiting; outside
// captures only (the caching host allocator keeps the buffer until the copy has run).
at::Tensor upload(const void* bytes, size_t n, const at::Device& device, const char* what) {
  TORCH_CHECK(!capturing(), "sassha_fused (CUDA): ", what, " is first needed inside a CUDA graph capture, but ",
              kWarmUp);
  return copy_up(bytes, n, pinned_bytes(n), device);
}

// Uploaded tables by key, at most kMaxEntries outside captures: the least recently
// used goes first, except entries a CUDA graph capture used (a replay reads them;
// they stay). Nothing is evicted or allocated (pinned) inside a capture. With
// ``spares``, each entry holds a pinned spare of its size, allocated outside
// captures (at its upload, or at its next use after a capture took it): a key that
// is new inside a capture is copied up from the spare of the least recently used
// entry of its size and device, and that buffer is then the new entry's ``host``,
// read at every replay, never handed out or written again.
class UploadCache {
 public:
  struct Entry {
    at::Tensor buffer;  // keeps the device memory alive
    at::Tensor host;    // the pinned source of a captured copy (a replay reads it again); else undefined
    at::Tensor spare;   // a pinned buffer of the table's size for a capture to fill (undefined: none)
    bool captured = false;
    uint64_t used = 0;
  };

  UploadCache(bool spares, const char* what) : spares_(spares), what_(what) {}

  template <typename Make>
  const Entry& get(std::string key, const at::Device& device, bool in_capture, const Make& make_bytes) {
    ++clock_;
    auto it = map_.find(key);
    if (it == map_.end()) {
      const std::vector<uint8_t> bytes = make_bytes();
      Entry e;
      if (in_capture) {
        TORCH_CHECK(spares_, "sassha_fused (CUDA): ", what_, " is first needed inside a CUDA graph capture, but ",
                    kWarmUp);
        Entry* donor = spare_of(bytes.size(), device);
        TORCH_CHECK(donor != nullptr, "sassha_fused (CUDA): ", what_, " changes inside a CUDA graph capture ",
                    "and no pinned spare of its size is left (none prepared, or taken by a capture); ", kWarmUp);
        e.host = std::move(donor->spare);
        donor->spare = at::Tensor();
        e.buffer = copy_up(bytes.data(), bytes.size(), e.host, device);
      } else {
        while (map_.size() >= kMaxEntries && evict_one()) {
        }
        e.buffer = upload(bytes.data(), bytes.size(), device, what_);
      }
      it = map_.emplace(std::move(key), std::move(e)).first;
    }
    Entry& entry = it->second;
    if (spares_ && !in_capture && !entry.spare.defined()) entry.spare = pinned_bytes(entry.buffer.numel());
    entry.captured = entry.captured || in_capture;
    entry.used = clock_;
    return entry;
  }

 private:
  static constexpr size_t kMaxEntries = 16;
  // the least recently used entry holding a spare of n bytes for ``device``, or null
  Entry* spare_of(size_t n, const at::Device& device) {
    Entry* best = nullptr;
    for (auto& kv : map_) {
      Entry& e = kv.second;
      if (e.spare.defined() && static_cast<size_t>(e.spare.numel()) == n && e.buffer.device() == device &&
          (best == nullptr || e.used < best->used))
        best = &e;
    }
    return best;
  }
  bool evict_one() {
    auto victim = map_.end();
    for (auto e = map_.begin(); e != map_.end(); ++e)
      if (!e->second.captured && (victim == map_.end() || e->second.used < victim->second.used)) victim = e;
    if (victim == map_.end()) return false;
    map_.erase(victim);
    return true;
  }
  std::unordered_map<std::string, Entry> map_;
  uint64_t clock_ = 0;
  const bool spares_;
  const char* const what_;
};

// Records -> device tables in two caches. Block maps (8 bytes per kBlockElems
// elements: 1.7 MB at 875M params) depend only on the tensors' sizes: keyed on the
// sizes, built once per parameter set and shared by every op over those tensors.
// Records (64 bytes per tensor) carry the addresses: keyed on their bytes, so new
// gradient addresses upload only the records, never the block map. Records entries
// keep pinned spares for captures (UploadCache); block maps do not (a parameter set
// first seen inside a capture raises).
class TableCache {
 public:
  DeviceTables get(const std::vector<TensorRec>& recs, const at::Device& device) {
    std::string sizes(sizeof(int64_t) * recs.size() + 1, '\0');
    for (size_t t = 0; t < recs.size(); ++t) std::memcpy(&sizes[t * sizeof(int64_t)], &recs[t].numel, sizeof(int64_t));
    sizes.back() = static_cast<char>(device.index());
    int64_t n_blocks = 0;
    for (const TensorRec& r : recs) n_blocks += (r.numel + kBlockElems - 1) / kBlockElems;
    DeviceTables t;
    if (n_blocks == 0) return t;
    const bool in_capture = capturing();
    std::lock_guard<std::mutex> lock(mu_);
    const auto& blocks = blocks_.get(std::move(sizes), device, in_capture, [&] {
      std::vector<uint8_t> bytes(static_cast<size_t>(n_blocks) * sizeof(BlockRec));
      auto* out = reinterpret_cast<BlockRec*>(bytes.data());
      for (size_t j = 0; j < recs.size(); ++j)
        for (int64_t c = 0; c * kBlockElems < recs[j].numel; ++c) *out++ = {static_cast<int32_t>(j), static_cast<int32_t>(c)};
      return bytes;
    });
    std::string key(reinterpret_cast<const char*>(recs.data()), recs.size() * sizeof(TensorRec));
    key.push_back(static_cast<char>(device.index()));
    const auto& records = recs_.get(std::move(key), device, in_capture, [&] {
      const auto* p = reinterpret_cast<const uint8_t*>(recs.data());
      return std::vector<uint8_t>(p, p + recs.size() * sizeof(TensorRec));
    });
    t.recs = static_cast<const TensorRec*>(records.buffer.const_data_ptr());
    t.blocks = static_cast<const BlockRec*>(blocks.buffer.const_data_ptr());
    t.n_blocks = n_blocks;
    return t;
  }

 private:
  std::mutex mu_;
  UploadCache blocks_{false, "a block map (a new parameter set)"};
  UploadCache recs_{true, "a tensor records table (new tensor addresses)"};
};

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const float* delta_ptr(const char* op, const at::Tensor& delta, const at::Tensor& p) {
  TORCH_CHECK(delta.numel() == 1 && delta.scalar_type() == at::kFloat && delta.device() == p.device(),
              "sassha_fused::", op, ": delta must be a one-element float32 tensor on the params' device");
  return delta.const_data_ptr<float>();
}

// ---- ops ---------------------------------------------------------------------------
at::Tensor sq_norm_cuda(at::TensorList sources, at::TensorList params, bool adaptive, bool acc_fp64) {
  TORCH_CHECK(sources.size() == params.size(), "sassha_fused::sq_norm: got ", sources.size(), " sources for ",
              params.size(), " params; pass exactly one entry per parameter in every list");
  check_params("sq_norm", params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<TensorRec> recs;
  recs.reserve(params.size());
  for (size_t j = 0; j < params.size(); ++j) {
    const bool fp32_source = sources[j].scalar_type() == at::kFloat && params[j].scalar_type() != at::kFloat;
    check_tensor("sq_norm", "sources", sources[j], j, params[j], fp32_source ? at::kFloat : params[j].scalar_type());
    TensorRec r = make_rec(params[j], j, "sq_norm");
    r.src = sources[j].const_data_ptr();
    r.src_fp32 = fp32_source;
    finish_rec(r);
    recs.push_back(r);
  }
  const auto acc = acc_fp64 ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({}, params[0].options().dtype(acc));
  const DeviceTables t = table_cache().get(recs, params[0].device());
  if (t.n_blocks == 0) return out;
  at::Tensor partials = at::empty({norm_scratch_elems(t.n_blocks)}, params[0].options().dtype(acc));
  launch_sq_norm(t.recs, t.blocks, t.n_blocks, adaptive, acc_fp64, partials.data_ptr(), out.data_ptr(),
                 current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void perturb_cuda(at::TensorList params, at::TensorList sources, at::TensorList backups, const at::Tensor& sq_norm,
                  c10::ArrayRef<int64_t> group_index, const at::Tensor& groups, double sign, bool adaptive) {
  const size_t n = params.size();
  TORCH_CHECK(sources.size() == n && backups.size() == n && group_index.size() == n,
              "sassha_fused::perturb: params, sources, backups and group_index need one entry per param");
  if (n == 0) return;
  check_params("perturb", params);
  TORCH_CHECK(sq_norm.numel() == 1 && sq_norm.device() == params[0].device() &&
                  (sq_norm.scalar_type() == at::kFloat || sq_norm.scalar_type() == at::kDouble),
              "sassha_fused::perturb: sq_norm must be a one-element float32/float64 tensor on the params' device");
  TORCH_CHECK(groups.dim() == 2 && groups.size(1) == GroupCol::kCount && groups.scalar_type() == at::kDouble &&
                  groups.device() == params[0].device() && groups.is_contiguous(),
              "sassha_fused::perturb: groups must be the contiguous float64 [n_groups, GroupCol.COUNT] group table "
              "on the params' device (functional.GroupTable)");
  const int64_t n_groups = groups.size(0);
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<TensorRec> recs;
  recs.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    const bool fp32_source = sources[j].scalar_type() == at::kFloat && params[j].scalar_type() != at::kFloat;
    check_tensor("perturb", "sources", sources[j], j, params[j], fp32_source ? at::kFloat : params[j].scalar_type());
    check_tensor("perturb", "backups", backups[j], j, params[j], params[j].scalar_type());
    TORCH_CHECK(group_index[j] >= 0 && group_index[j] < n_groups, "sassha_fused::perturb: group_index ",
                group_index[j], " is outside the group table of ", n_groups, " rows");
    TensorRec r = make_rec(params[j], j, "perturb");
    r.src = sources[j].const_data_ptr();
    r.aux = backups[j].data_ptr();
    r.src_fp32 = fp32_source;
    r.group = static_cast<int32_t>(group_index[j]);
    finish_rec(r);
    recs.push_back(r);
  }
  const DeviceTables t = table_cache().get(recs, params[0].device());
  if (t.n_blocks == 0) return;
  const at::Tensor norm = sq_norm.contiguous();
  launch_perturb(t.recs, t.blocks, t.n_blocks, norm.const_data_ptr(), norm.scalar_type() == at::kDouble,
                 groups.const_data_ptr<double>(), sign, adaptive, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void probes_cuda(at::TensorList out, c10::ArrayRef<int64_t> param_index, c10::ArrayRef<int64_t> element_offset,
                 int64_t prefix) {
  TORCH_CHECK(param_index.size() == out.size(), "sassha_fused::probes: got ", out.size(), " tensors but ",
              param_index.size(), " param_index values; pass exactly one entry per parameter in every list");
  check_element_offsets("probes", element_offset, out);
  if (out.empty()) return;
  check_params("probes", out);
  const c10::cuda::CUDAGuard guard(out[0].device());
  std::vector<TensorRec> recs;
  recs.reserve(out.size());
  for (size_t j = 0; j < out.size(); ++j) {
    TensorRec r = make_rec(out[j], j, "probes");
    r.param_index = static_cast<uint32_t>(param_index[j]);
    r.element_offset = offset_of(element_offset, j);
    finish_rec(r);
    recs.push_back(r);
  }
  const DeviceTables t = table_cache().get(recs, out[0].device());
  if (t.n_blocks == 0) return;
  launch_probes(t.recs, t.blocks, t.n_blocks, static_cast<uint32_t>(prefix), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fd_move_cuda(at::TensorList params, at::TensorList bases, at::TensorList saves, const at::Tensor& delta,
                  c10::ArrayRef<int64_t> param_index, c10::ArrayRef<int64_t> element_offset, int64_t prefix,
                  double sign) {
  const size_t n = params.size();
  TORCH_CHECK(param_index.size() == n && (bases.empty() || bases.size() == n) && (saves.empty() || saves.size() == n),
              "sassha_fused::fd_move: pass one param_index per param, and no bases/saves or one per param");
  check_element_offsets("fd_move", element_offset, params);
  if (n == 0) return;
  check_params("fd_move", params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<TensorRec> recs;
  recs.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    TensorRec r = make_rec(params[j], j, "fd_move");
    if (!bases.empty()) check_tensor("fd_move", "bases", bases[j], j, params[j], params[j].scalar_type());
    if (!saves.empty()) check_tensor("fd_move", "saves", saves[j], j, params[j], params[j].scalar_type());
    r.src = bases.empty() ? r.x : bases[j].const_data_ptr();
    r.aux = saves.empty() ? nullptr : saves[j].data_ptr();
    r.param_index = static_cast<uint32_t>(param_index[j]);
    r.element_offset = offset_of(element_offset, j);
    finish_rec(r);
    recs.push_back(r);
  }
  const DeviceTables t = table_cache().get(recs, params[0].device());
  if (t.n_blocks == 0) return;
  launch_fd_move(t.recs, t.blocks, t.n_blocks, static_cast<uint32_t>(prefix), delta_ptr("fd_move", delta, params[0]),
                 static_cast<float>(sign), !saves.empty(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fd_fold_cuda(at::TensorList acc, at::TensorList grads, at::TensorList baselines, const at::Tensor& delta,
                  c10::ArrayRef<int64_t> param_index, c10::ArrayRef<int64_t> element_offset, int64_t prefix,
                  double coefficient, bool first) {
  const size_t n = acc.size();
  TORCH_CHECK(grads.size() == n && param_index.size() == n && (baselines.empty() || baselines.size() == n),
              "sassha_fused::fd_fold: pass one grad and one param_index per tensor, and no baselines or one each");
  check_element_offsets("fd_fold", element_offset, acc);
  if (n == 0) return;
  check_params("fd_fold", acc);
  const c10::cuda::CUDAGuard guard(acc[0].device());
  std::vector<TensorRec> recs;
  recs.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    check_tensor("fd_fold", "grads", grads[j], j, acc[j], acc[j].scalar_type());
    if (!baselines.empty()) check_tensor("fd_fold", "baselines", baselines[j], j, acc[j], acc[j].scalar_type());
    TensorRec r = make_rec(acc[j], j, "fd_fold");
    r.src = grads[j].const_data_ptr();
    r.aux = baselines.empty() ? nullptr : const_cast<void*>(baselines[j].const_data_ptr());
    r.param_index = static_cast<uint32_t>(param_index[j]);
    r.element_offset = offset_of(element_offset, j);
    finish_rec(r);
    recs.push_back(r);
  }
  const DeviceTables t = table_cache().get(recs, acc[0].device());
  if (t.n_blocks == 0) return;
  launch_fd_fold(t.recs, t.blocks, t.n_blocks, static_cast<uint32_t>(prefix), delta_ptr("fd_fold", delta, acc[0]),
                 static_cast<float>(coefficient), first, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The group scales of param j under state_bits=8: encoding.n_groups(numel) float32 values.
void check_scales(const char* what, const at::Tensor& t, int64_t j, const at::Tensor& p) {
  TORCH_CHECK(t.defined() && t.device() == p.device() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "sassha_fused::update: ", what, "[", j, "] must be a contiguous float32 tensor on its param's "
              "device (one scale per group of 32 elements)");
  TORCH_CHECK(t.numel() == n_groups(p.numel()), "sassha_fused::update: ", what, "[", j, "] has ", t.numel(),
              " scales but its param of ", p.numel(), " elements needs ", n_groups(p.numel()),
              " (one per group of 32 elements, encoding.n_groups)");
}

void update_cuda(at::TensorList params, at::TensorList x_t, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_hessian_diags, at::TensorList exp_avg_scales,
                 at::TensorList exp_hessian_diag_scales, const c10::List<std::optional<at::Tensor>>& master_corrections,
                 int64_t state_bits, const at::Tensor& scalars, double power, int64_t refresh_mode,
                 const c10::List<std::optional<at::Tensor>>& ys, c10::ArrayRef<int64_t> param_index,
                 c10::ArrayRef<int64_t> element_offset, c10::ArrayRef<int64_t> prefixes,
                 const std::optional<at::Tensor>& fd) {
  const size_t n = params.size();
  TORCH_CHECK(x_t.size() == n && grads.size() == n && exp_avgs.size() == n && exp_hessian_diags.size() == n &&
                  param_index.size() == n,
              "sassha_fused::update: params, x_t, grads, exp_avgs, exp_hessian_diags and param_index need one "
              "entry per param");
  check_element_offsets("update", element_offset, params);
  TORCH_CHECK(state_bits == 32 || state_bits == 16 || state_bits == 8,
              "sassha_fused::update: state_bits must be 32, 16 or 8, got ", state_bits);
  TORCH_CHECK(state_bits == 8 ? (exp_avg_scales.size() == n && exp_hessian_diag_scales.size() == n)
                              : (exp_avg_scales.empty() && exp_hessian_diag_scales.empty()),
              "sassha_fused::update: with state_bits=8 pass one exp_avg_scales and one exp_hessian_diag_scales "
              "entry per param; scales are for state_bits=8 only (empty lists otherwise)");
  TORCH_CHECK(master_corrections.empty() || master_corrections.size() == n, "sassha_fused::update: got ",
              master_corrections.size(), " master_corrections for ", n,
              " params; pass one per param (None where a param has none) or an empty list (no master weights)");
  TORCH_CHECK(refresh_mode >= RefreshMode::kNone && refresh_mode <= RefreshMode::kPrecomputed,
              "sassha_fused::update: unknown refresh_mode ", refresh_mode);
  const bool refresh = refresh_mode != RefreshMode::kNone;
  const int64_t n_samples = static_cast<int64_t>(prefixes.size());
  if (refresh) {
    TORCH_CHECK(n_samples >= 1 && ys.size() == static_cast<size_t>(n_samples) * n,
                "sassha_fused::update: on a refresh step pass n_samples * n_params ys (None: 0)");
    TORCH_CHECK(refresh_mode == RefreshMode::kAutograd ||
                    (fd.has_value() && fd->numel() == 2 && fd->scalar_type() == at::kFloat),
                "sassha_fused::update: finite-difference modes need fd = [delta, h_floor] (float32)");
  }
  if (n == 0) return;
  check_params("update", params);
  TORCH_CHECK(scalars.dim() == 2 && scalars.size(0) == static_cast<int64_t>(n) &&
                  scalars.size(1) == UpdateCol::kCount && scalars.scalar_type() == at::kDouble &&
                  scalars.device() == params[0].device() && scalars.is_contiguous(),
              "sassha_fused::update: scalars must be a contiguous float64 [n_params, UpdateCol.COUNT] table on the "
              "params' device (functional.update_scalars)");
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<TensorRec> recs;
  recs.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    const auto pt = params[j].scalar_type();
    check_tensor("update", "grads", grads[j], j, params[j], pt);
    check_tensor("update", "x_t", x_t[j], j, params[j], pt);
    // state_bits 32: float32; 16: bfloat16; 8: int8 codes of m, uint8 codes of D (+ float32 scales)
    const at::ScalarType m_dtype = state_bits == 32 ? at::kFloat : state_bits == 16 ? at::kBFloat16 : at::kChar;
    const at::ScalarType d_dtype = state_bits == 32 ? at::kFloat : state_bits == 16 ? at::kBFloat16 : at::kByte;
    check_tensor("update", "exp_avgs", exp_avgs[j], j, params[j], m_dtype);
    check_tensor("update", "exp_hessian_diags", exp_hessian_diags[j], j, params[j], d_dtype);
    TensorRec r = make_rec(params[j], j, "update");
    r.src = grads[j].const_data_ptr();
    r.aux = const_cast<void*>(x_t[j].const_data_ptr());
    r.m = exp_avgs[j].data_ptr();
    r.d = exp_hessian_diags[j].data_ptr();
    if (state_bits == 8) {
      check_scales("exp_avg_scales", exp_avg_scales[j], j, params[j]);
      check_scales("exp_hessian_diag_scales", exp_hessian_diag_scales[j], j, params[j]);
      r.m_scale = exp_avg_scales[j].data_ptr<float>();
      r.d_scale = exp_hessian_diag_scales[j].data_ptr<float>();
    }
    if (!master_corrections.empty()) {
      const std::optional<at::Tensor> corr = master_corrections[j];
      if (corr.has_value() && corr->defined()) {
        TORCH_CHECK(pt == at::kBFloat16, "sassha_fused::update: master_corrections[", j, "] is given for a ", pt,
                    " parameter; master weights are for bfloat16 parameters (pass None for the others)");
        TORCH_CHECK(corr->scalar_type() == at::kChar || corr->scalar_type() == at::kShort,
                    "sassha_fused::update: master_corrections[", j, "] has dtype ", corr->scalar_type(),
                    "; expected int8 (master_weight_bits=24) or int16 (master_weight_bits=32)");
        TORCH_CHECK(corr->device() == params[j].device() && corr->numel() == params[j].numel() &&
                        corr->is_contiguous(),
                    "sassha_fused::update: master_corrections[", j, "] must be a contiguous tensor of its param's ",
                    params[j].numel(), " elements on its device");
        r.corr = corr->data_ptr();
        r.master_bits = corr->scalar_type() == at::kChar ? 24 : 32;
      }
    }
    r.param_index = static_cast<uint32_t>(param_index[j]);
    r.element_offset = offset_of(element_offset, j);
    finish_rec(r);
    recs.push_back(r);
  }
  const DeviceTables t = table_cache().get(recs, params[0].device());
  if (t.n_blocks == 0) return;
  at::Tensor extra;  // refresh inputs and prefixes, one small copy
  const void* const* d_ys = nullptr;
  const uint32_t* d_prefixes = nullptr;
  if (refresh) {
    TORCH_CHECK(!capturing(), "sassha_fused::update: a Hessian-refresh step cannot be captured in a CUDA graph "
                "(its probes change every refresh); capture a non-refresh step and run refresh steps eagerly");
    std::vector<const void*> y_ptrs(ys.size(), nullptr);
    for (size_t k = 0; k < ys.size(); ++k) {
      const std::optional<at::Tensor> y = ys[k];
      if (y.has_value() && y->defined()) {
        const size_t j = k % n;
        check_tensor("update", "ys", *y, static_cast<int64_t>(k), params[j], params[j].scalar_type());
        y_ptrs[k] = y->const_data_ptr();
      }
    }
    const size_t o_prefixes = align16(y_ptrs.size() * sizeof(void*));
    std::vector<uint8_t> bytes(o_prefixes + prefixes.size() * sizeof(uint32_t));
    std::memcpy(bytes.data(), y_ptrs.data(), y_ptrs.size() * sizeof(void*));
    for (size_t s = 0; s < prefixes.size(); ++s) {
      const uint32_t v = static_cast<uint32_t>(prefixes[s]);
      std::memcpy(bytes.data() + o_prefixes + s * sizeof(uint32_t), &v, sizeof(v));
    }
    extra = upload(bytes.data(), bytes.size(), params[0].device(), "a refresh step's inputs");
    const auto* base = static_cast<const uint8_t*>(extra.const_data_ptr());
    d_ys = reinterpret_cast<const void* const*>(base);
    d_prefixes = reinterpret_cast<const uint32_t*>(base + o_prefixes);
  }
  const float* d_fd = nullptr;
  if (refresh && refresh_mode != RefreshMode::kAutograd) {
    TORCH_CHECK(fd->device() == params[0].device() && fd->is_contiguous(),
                "sassha_fused::update: fd must be a contiguous tensor on the params' device");
    d_fd = fd->const_data_ptr<float>();
  }
  launch_update(t.recs, t.blocks, t.n_blocks, static_cast<int64_t>(n), scalars.const_data_ptr<double>(), power,
                static_cast<int>(refresh_mode), d_ys, d_prefixes, n_samples, d_fd, static_cast<int>(state_bits),
                current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace sassha

TORCH_LIBRARY_IMPL(sassha_fused, CUDA, m) {
  m.impl("sq_norm", &sassha::cuda::sq_norm_cuda);
  m.impl("perturb", &sassha::cuda::perturb_cuda);
  m.impl("probes", &sassha::cuda::probes_cuda);
  m.impl("fd_move", &sassha::cuda::fd_move_cuda);
  m.impl("fd_fold", &sassha::cuda::fd_fold_cuda);
  m.impl("update", &sassha::cuda::update_cuda);
}
