// Per-element math of SASSHA's four phases, shared by the CPU loops
// (sassha_ops.cpp) and the CUDA kernels (sassha_cuda_kernels.cu).
//
// Everything here is a pure function of scalars: no tensors, no loops, no
// memory. The reference these mirror is sassha_fused/backends/eager.py; the
// probe hash is the one written down in sassha_fused/probes.py.
//
// This header must stay free of torch includes: nvcc compiles it with plain
// CUDA only.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SASSHA_HD __host__ __device__ __forceinline__
#else
#define SASSHA_HD inline
#endif

namespace sassha {

// Elements per probe word: one 32-bit hash yields the signs of 32 elements.
constexpr int64_t kProbeWordBits = 32;

// MurmurHash3's 32-bit finaliser (probes.py: fmix32), wrapping uint32 math.
SASSHA_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The 32 signs of probe word `word` of the stream (k0, k1): bit b set means
// z[32 * word + b] = +1, clear means -1.
SASSHA_HD uint32_t probe_bits(uint32_t word, uint32_t k0, uint32_t k1) {
  return fmix32(fmix32(word ^ k0) ^ k1);
}

// z for bit `bit` of a probe word, as +1/-1 in M. Integer arithmetic, not a
// branch or a select on the bit: the bits are random, so a branch mispredicts
// half the time (the CPU probe pass ran at ~14 cycles per element that way), and
// this form vectorises (shift, and, multiply-add, convert).
template <typename M>
SASSHA_HD M probe_sign(uint32_t bits, uint32_t bit) {
  return static_cast<M>(static_cast<int32_t>((bits >> bit) & 1u) * 2 - 1);
}

template <typename M>
SASSHA_HD M probe_element(int64_t element, uint32_t k0, uint32_t k1) {
  const uint32_t bits = probe_bits(static_cast<uint32_t>(element >> 5), k0, k1);
  return probe_sign<M>(bits, static_cast<uint32_t>(element & 31));
}

// ---- phase 1: one term of ||w * v||^2, w = |x| when adaptive ---------------
template <typename A, bool ADAPTIVE>
SASSHA_HD A sq_norm_term(A v, A x) {
  if (ADAPTIVE) v = std::fabs(x) * v;
  return v * v;
}

// ---- phase 2: the perturbation --------------------------------------------
// scale = sign * rho / (sqrt(sq_norm) + perturb_eps), computed as the eager
// reference does in torch: reciprocal of the denominator times (sign * rho),
// in the accumulator dtype A of the norm, then cast to the math dtype.
template <typename A>
SASSHA_HD A perturb_scale(A sq_norm, double sign_rho, double perturb_eps) {
  const A r = A(1) / (std::sqrt(sq_norm) + A(perturb_eps));
  return r * A(sign_rho);
}

// x0 + scale * v [* x0^2 when adaptive]: the perturbed point, before rounding
// to the param dtype.
template <typename M, bool ADAPTIVE>
SASSHA_HD M perturb_value(M x0, M v, M scale) {
  M e = v * scale;
  if (ADAPTIVE) e = e * (x0 * x0);
  return x0 + e;
}

// ---- phase 4: the update ---------------------------------------------------
// Hyper-parameters of one tensor, already cast to the math dtype M.
template <typename M>
struct UpdateScalars {
  M beta1;            // momentum decay
  M one_minus_beta1;  // 1 - beta1, rounded once on the host as torch's alpha is
  M beta2;            // decay of the |h| EMA
  M one_minus_beta2;  // 1 - beta2
  M decay;            // 1 - lr * weight_decay (decoupled weight decay)
  M neg_step_size;    // -lr / (1 - beta1^t)
  M inv_bias_correction2;  // 1 / c2, c2 = (1 - beta2^t_refresh)^p (a multiply, not a divide, per element)
  M eps;              // added after the power
  M power;            // hessian_power p (the SQRT_POWER path ignores it)
  M n_samples;        // S, the number of Hutchinson probes averaged
};

// D^p: the sqrt fast path for the default p = 0.5 (as torch's pow does).
template <typename M, bool SQRT_POWER>
SASSHA_HD M hessian_power(M d, M power) {
  if (SQRT_POWER) return std::sqrt(d);
  return std::pow(d, power);
}

// D_t = beta2 D_{t-1} + (1 - beta2) |h_t|, h_t the sample mean of z * Hz
// (``h_sum`` is the sum over samples; the mean divides it by S).
template <typename M>
SASSHA_HD M hessian_ema(M d, M h_sum, const UpdateScalars<M>& s) {
  const M h = h_sum / s.n_samples;
  return d * s.beta2 + s.one_minus_beta2 * std::fabs(h);
}

// m_t = beta1 m + (1 - beta1) g;  returns x_{t+1} and writes m_t to ``m``.
//   x_{t+1} = x_t (1 - lr wd) - lr / (1 - beta1^t) * m_t / (D^p / c2 + eps)
template <typename M, bool SQRT_POWER>
SASSHA_HD M sassha_update(M x, M& m, M d, M g, const UpdateScalars<M>& s) {
  m = m * s.beta1 + s.one_minus_beta1 * g;
  const M denom = hessian_power<M, SQRT_POWER>(d, s.power) * s.inv_bias_correction2 + s.eps;
  return x * s.decay + s.neg_step_size * (m / denom);
}

}  // namespace sassha
