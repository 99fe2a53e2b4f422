// CUDA implementations of the sassha_fused operators (schemas in sassha_ops.cpp):
// argument checks, the per-launch tables, and calls into sassha_cuda_kernels.cu.
// Compiled only when torch has CUDA and nvcc is present.
//
// Tables travel to the device in one pinned-memory copy per call (non-blocking;
// torch's pinned allocator keeps the host buffer alive until the copy ran), so a
// launch covers any number of tensors and Hutchinson samples; the host never
// waits for the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "sassha_cuda.h"

namespace sassha {
namespace cuda {
namespace {

int32_t dtype_code(const at::Tensor& t, const char* op, int64_t j) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK(false, "sassha_fused::", op, " (CUDA): params[", j, "] has dtype ", t.scalar_type(),
                  "; the CUDA kernels take float32, bfloat16 and float16 (use the 'foreach' backend "
                  "for float64)");
  }
  return -1;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_tensor(const char* op, const char* what, const at::Tensor& t, int64_t j, const at::Tensor& p,
                  at::ScalarType expected) {
  TORCH_CHECK(t.defined(), "sassha_fused::", op, ": ", what, "[", j, "] is undefined");
  TORCH_CHECK(t.device() == p.device(), "sassha_fused::", op, ": ", what, "[", j, "] is on ", t.device(),
              " but its param is on ", p.device(), "; keep each parameter's tensors on one device");
  TORCH_CHECK(t.scalar_type() == expected, "sassha_fused::", op, ": ", what, "[", j, "] has dtype ",
              t.scalar_type(), " but ", expected, " is expected (16-bit params keep float32 state)");
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

// Host-side tables of one launch, copied to the device in one transfer.
struct Tables {
  std::vector<TensorRec> recs;
  std::vector<BlockRec> blocks;
  std::vector<const void*> hz;
  std::vector<uint32_t> keys;
  at::Tensor device_buffer;
  const TensorRec* d_recs = nullptr;
  const BlockRec* d_blocks = nullptr;
  const void* const* d_hz = nullptr;
  const uint32_t* d_keys = nullptr;

  void add_blocks(int64_t tensor, int64_t numel) {
    for (int64_t c = 0; c * kBlockElems < numel; ++c) blocks.push_back({static_cast<int32_t>(tensor), static_cast<int32_t>(c)});
  }

  void upload(const at::Device& device) {
    auto align = [](size_t n) { return (n + 15) & ~size_t(15); };
    const size_t o_blocks = align(recs.size() * sizeof(TensorRec));
    const size_t o_hz = o_blocks + align(blocks.size() * sizeof(BlockRec));
    const size_t o_keys = o_hz + align(hz.size() * sizeof(void*));
    const size_t total = o_keys + align(keys.size() * sizeof(uint32_t));
    at::Tensor host = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    auto* base = static_cast<uint8_t*>(host.data_ptr());
    std::memcpy(base, recs.data(), recs.size() * sizeof(TensorRec));
    std::memcpy(base + o_blocks, blocks.data(), blocks.size() * sizeof(BlockRec));
    if (!hz.empty()) std::memcpy(base + o_hz, hz.data(), hz.size() * sizeof(void*));
    if (!keys.empty()) std::memcpy(base + o_keys, keys.data(), keys.size() * sizeof(uint32_t));
    device_buffer = host.to(device, /*non_blocking=*/true);
    auto* d = static_cast<const uint8_t*>(device_buffer.const_data_ptr());
    d_recs = reinterpret_cast<const TensorRec*>(d);
    d_blocks = reinterpret_cast<const BlockRec*>(d + o_blocks);
    d_hz = reinterpret_cast<const void* const*>(d + o_hz);
    d_keys = reinterpret_cast<const uint32_t*>(d + o_keys);
  }
};

TensorRec blank_rec() {
  TensorRec r;
  std::memset(&r, 0, sizeof(r));
  return r;
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor sq_norm_cuda(at::TensorList sources, at::TensorList params, bool adaptive, bool acc_fp64) {
  TORCH_CHECK(sources.size() == params.size(), "sassha_fused::sq_norm: got ", sources.size(), " sources for ",
              params.size(), " params");
  check_params("sq_norm", params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  Tables t;
  for (size_t j = 0; j < params.size(); ++j) {
    const bool fp32_source = sources[j].scalar_type() == at::kFloat && params[j].scalar_type() != at::kFloat;
    check_tensor("sq_norm", "sources", sources[j], j, params[j], fp32_source ? at::kFloat : params[j].scalar_type());
    TensorRec r = blank_rec();
    r.param = params[j].data_ptr();
    r.source = sources[j].const_data_ptr();
    r.numel = params[j].numel();
    r.dtype = dtype_code(params[j], "sq_norm", j);
    r.source_fp32 = fp32_source;
    r.aligned = aligned16(r.param) && aligned16(r.source);
    t.recs.push_back(r);
    t.add_blocks(j, r.numel);
  }
  const auto acc = acc_fp64 ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({}, params[0].options().dtype(acc));
  if (t.blocks.empty()) return out;
  t.upload(params[0].device());
  at::Tensor partials = at::empty({static_cast<int64_t>(t.blocks.size())}, params[0].options().dtype(acc));
  launch_sq_norm(t.d_recs, t.d_blocks, t.blocks.size(), adaptive, acc_fp64, partials.data_ptr(), out.data_ptr(),
                 current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void perturb_cuda(at::TensorList params, at::TensorList sources, at::TensorList backups, const at::Tensor& sq_norm,
                  c10::ArrayRef<double> sign_rho, c10::ArrayRef<double> perturb_eps, bool adaptive) {
  const size_t n = params.size();
  TORCH_CHECK(sources.size() == n && backups.size() == n && sign_rho.size() == n && perturb_eps.size() == n,
              "sassha_fused::perturb: params, sources, backups, sign_rho and perturb_eps need one entry per param");
  if (n == 0) return;
  check_params("perturb", params);
  TORCH_CHECK(sq_norm.numel() == 1 && sq_norm.device() == params[0].device() &&
                  (sq_norm.scalar_type() == at::kFloat || sq_norm.scalar_type() == at::kDouble),
              "sassha_fused::perturb: sq_norm must be a one-element float32/float64 tensor on the params' device");
  const c10::cuda::CUDAGuard guard(params[0].device());
  Tables t;
  for (size_t j = 0; j < n; ++j) {
    const bool fp32_source = sources[j].scalar_type() == at::kFloat && params[j].scalar_type() != at::kFloat;
    check_tensor("perturb", "sources", sources[j], j, params[j], fp32_source ? at::kFloat : params[j].scalar_type());
    check_tensor("perturb", "backups", backups[j], j, params[j], params[j].scalar_type());
    TensorRec r = blank_rec();
    r.param = params[j].data_ptr();
    r.source = sources[j].const_data_ptr();
    r.backup = backups[j].data_ptr();
    r.numel = params[j].numel();
    r.dtype = dtype_code(params[j], "perturb", j);
    r.source_fp32 = fp32_source;
    r.aligned = aligned16(r.param) && aligned16(r.source) && aligned16(r.backup);
    r.scalars[0] = sign_rho[j];
    r.scalars[1] = perturb_eps[j];
    t.recs.push_back(r);
    t.add_blocks(j, r.numel);
  }
  if (t.blocks.empty()) return;
  t.upload(params[0].device());
  const at::Tensor norm = sq_norm.contiguous();
  launch_perturb(t.d_recs, t.d_blocks, t.blocks.size(), norm.const_data_ptr(), norm.scalar_type() == at::kDouble,
                 adaptive, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void probes_cuda(at::TensorList out, c10::ArrayRef<int64_t> keys) {
  TORCH_CHECK(keys.size() == 2 * out.size(), "sassha_fused::probes: pass (k0, k1) for each tensor");
  if (out.empty()) return;
  check_params("probes", out);
  const c10::cuda::CUDAGuard guard(out[0].device());
  Tables t;
  for (size_t j = 0; j < out.size(); ++j) {
    TensorRec r = blank_rec();
    r.param = out[j].data_ptr();
    r.numel = out[j].numel();
    r.dtype = dtype_code(out[j], "probes", j);
    r.aligned = aligned16(r.param);
    r.k0 = static_cast<uint32_t>(keys[2 * j]);
    r.k1 = static_cast<uint32_t>(keys[2 * j + 1]);
    t.recs.push_back(r);
    t.add_blocks(j, r.numel);
  }
  if (t.blocks.empty()) return;
  t.upload(out[0].device());
  launch_probes(t.d_recs, t.d_blocks, t.blocks.size(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_hessian_diags, at::TensorList backups,
                 const c10::List<std::optional<at::Tensor>>& hvps, c10::ArrayRef<int64_t> keys,
                 c10::ArrayRef<double> scalars, int64_t n_samples, bool refresh) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_hessian_diags.size() == n && backups.size() == n,
              "sassha_fused::update: params, grads, exp_avgs, exp_hessian_diags and backups need one entry per param");
  TORCH_CHECK(scalars.size() == static_cast<size_t>(kNumScalars) * n, "sassha_fused::update: pass ",
              static_cast<int>(kNumScalars), " scalars per param");
  if (refresh) {
    TORCH_CHECK(n_samples >= 1 && hvps.size() == static_cast<size_t>(n_samples) * n && keys.size() == 2 * hvps.size(),
                "sassha_fused::update: on a refresh step pass n_samples * n_params hvps and two key words each");
  }
  if (n == 0) return;
  check_params("update", params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  Tables t;
  bool sqrt_power = true;
  for (size_t j = 0; j < n; ++j) {
    const auto pt = params[j].scalar_type();
    check_tensor("update", "grads", grads[j], j, params[j], pt);
    check_tensor("update", "backups", backups[j], j, params[j], pt);
    check_tensor("update", "exp_avgs", exp_avgs[j], j, params[j], at::kFloat);
    check_tensor("update", "exp_hessian_diags", exp_hessian_diags[j], j, params[j], at::kFloat);
    TensorRec r = blank_rec();
    r.param = params[j].data_ptr();
    r.source = grads[j].const_data_ptr();
    r.backup = const_cast<void*>(backups[j].const_data_ptr());
    r.exp_avg = exp_avgs[j].data_ptr<float>();
    r.exp_hessian_diag = exp_hessian_diags[j].data_ptr<float>();
    r.numel = params[j].numel();
    r.dtype = dtype_code(params[j], "update", j);
    r.aligned = aligned16(r.param) && aligned16(r.source) && aligned16(r.backup) && aligned16(r.exp_avg) &&
                aligned16(r.exp_hessian_diag);
    for (int k = 0; k < kNumScalars; ++k) r.scalars[k] = scalars[kNumScalars * j + k];
    sqrt_power = sqrt_power && r.scalars[kPower] == 0.5;
    if (refresh) {
      r.hz_index = static_cast<int64_t>(t.hz.size());
      for (int64_t s = 0; s < n_samples; ++s) {
        const size_t k = static_cast<size_t>(s) * n + j;
        const std::optional<at::Tensor> h = hvps[k];
        const void* ptr = nullptr;
        if (h.has_value() && h->defined()) {
          check_tensor("update", "hvps", *h, static_cast<int64_t>(k), params[j], pt);
          ptr = h->const_data_ptr();
        }
        r.aligned = r.aligned && aligned16(ptr);
        t.hz.push_back(ptr);
        t.keys.push_back(static_cast<uint32_t>(keys[2 * k]));
        t.keys.push_back(static_cast<uint32_t>(keys[2 * k + 1]));
      }
    }
    t.recs.push_back(r);
    t.add_blocks(j, r.numel);
  }
  if (t.blocks.empty()) return;
  t.upload(params[0].device());
  launch_update(t.d_recs, t.d_blocks, t.blocks.size(), refresh ? t.d_hz : nullptr, refresh ? t.d_keys : nullptr,
                n_samples, refresh, sqrt_power, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace sassha

TORCH_LIBRARY_IMPL(sassha_fused, CUDA, m) {
  m.impl("sq_norm", &sassha::cuda::sq_norm_cuda);
  m.impl("perturb", &sassha::cuda::perturb_cuda);
  m.impl("probes", &sassha::cuda::probes_cuda);
  m.impl("update", &sassha::cuda::update_cuda);
}
