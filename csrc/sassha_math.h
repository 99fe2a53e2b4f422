// Per-element math of SASSHA's phases, shared by the CPU loops (sassha_ops.cpp)
// and the CUDA kernels (sassha_cuda_kernels.cu), and the table layouts the host
// passes them.
//
// Everything here is a pure function of scalars: no tensors, no loops, no
// memory. The reference these mirror is sassha_fused/backends/eager.py; the
// probe hash is the one written down in sassha_fused/probes.py; the layouts are
// GroupCol and UpdateCol of sassha_fused/backends/base.py (tests/test_layouts.py
// checks they agree).
//
// This header must stay free of torch includes: nvcc compiles it with plain
// CUDA only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SASSHA_HD __host__ __device__ __forceinline__
#else
#define SASSHA_HD inline
#endif

namespace sassha {

// ---- layouts ------------------------------------------------------------------
// Columns of the group table (one row per param group, float64).
struct GroupCol {
  enum : int { kLr = 0, kBeta1 = 1, kBeta2 = 2, kWeightDecay = 3, kEps = 4, kRho = 5, kPerturbEps = 6, kCount = 7 };
};

// Columns of the per-tensor update-scalar table (functional.update_scalars, float64).
struct UpdateCol {
  enum : int {
    kNegStep = 0,        // -lr / (1 - beta1^t)
    kDecay = 1,          // 1 - lr * weight_decay
    kBeta1 = 2,
    kOneMinusBeta1 = 3,
    kBeta2 = 4,
    kOneMinusBeta2 = 5,
    kC2 = 6,             // (1 - beta2^t)^p
    kEps = 7,
    kLive = 8,           // 1: update; 0: restore x_t and leave the state alone
    kCount = 9
  };
};

// How the update gets the Hutchinson sample mean h on a refresh step.
struct RefreshMode {
  enum : int {
    kNone = 0,         // no refresh: D is kept
    kAutograd = 1,     // ys[s] = H z_s: h = (1/S) sum_s z_s * ys[s]
    kFdDirect = 2,     // ys[0] = grad f(x~ + delta z): h = (ys[0] - g) * z / delta
    kPrecomputed = 3   // ys[0] = h (folded by fd_fold)
  };
};

// Finite differences resolve |h| only down to h_floor * |g~| (the gradients'
// relative precision over delta): below that, |h| is taken as that resolution.
template <typename M>
SASSHA_HD M fd_magnitude(M h, M g, M h_floor) {
  const M floor = h_floor * std::fabs(g);
  const M a = std::fabs(h);
  return a < floor ? floor : a;
}

// ---- probes ---------------------------------------------------------------------
// Elements per probe word: one 32-bit hash yields the signs of 32 elements.
constexpr int64_t kProbeWordBits = 32;
// Largest tensor the probes address (probes.py: MAX_PROBE_NUMEL): words fit in 32 bits.
constexpr int64_t kMaxProbeNumel = int64_t(1) << 37;
constexpr uint32_t kKey1Salt = 0x9E3779B9u;

// MurmurHash3's 32-bit finaliser (probes.py: fmix32), wrapping uint32 math.
SASSHA_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// A parameter's stream key from its probe vector's prefix (probes.py: param_key).
struct ProbeKey {
  uint32_t k0, k1;
};
SASSHA_HD ProbeKey param_key(uint32_t prefix, uint32_t param_index) {
  const uint32_t c = fmix32(prefix ^ param_index);
  return {c, fmix32(c ^ kKey1Salt)};
}

// The 32 signs of probe word `word` of the stream (k0, k1): bit b set means
// z[32 * word + b] = +1, clear means -1.
SASSHA_HD uint32_t probe_bits(uint32_t word, ProbeKey key) { return fmix32(fmix32(word ^ key.k0) ^ key.k1); }

// The signs of elements [element, element + n) of the stream (1 <= n <= 32) as
// bits 0 .. n-1: bit b set means z[element + b] = +1. ``element`` is the global
// element (a shard's element_offset plus its local index), any value, not only a
// multiple of 32: a run that crosses a word boundary takes the second word's low
// bits (two hashes); one inside a word, as every run of an unsharded tensor, one.
SASSHA_HD uint32_t probe_bits_at(int64_t element, ProbeKey key, int64_t n = kProbeWordBits) {
  const uint32_t word = static_cast<uint32_t>(element >> 5);
  const uint32_t shift = static_cast<uint32_t>(element & 31);
  uint32_t bits = probe_bits(word, key) >> shift;
  // shift > 0 here (n <= 32), so the left shift is by less than 32
  if (shift + n > kProbeWordBits) bits |= probe_bits(word + 1u, key) << (32u - shift);
  return bits;
}

// z for bit `bit` of a probe word, as +1/-1 in M. Integer arithmetic, not a
// branch or a select on the bit: the bits are random, so a branch mispredicts
// half the time, and this form vectorises (shift, and, multiply-add, convert).
template <typename M>
SASSHA_HD M probe_sign(uint32_t bits, uint32_t bit) {
  return static_cast<M>(static_cast<int32_t>((bits >> bit) & 1u) * 2 - 1);
}

// ---- norms and the perturbation ------------------------------------------------
// One term of ||w * v||^2, w = |x| when adaptive.
template <typename A, bool ADAPTIVE>
SASSHA_HD A sq_norm_term(A v, A x) {
  if (ADAPTIVE) v = std::fabs(x) * v;
  return v * v;
}

// scale = sign * rho / (sqrt(sq_norm) + perturb_eps), computed as the eager
// reference does in torch: reciprocal of the denominator times (sign * rho), in
// the accumulator dtype A of the norm.
template <typename A>
SASSHA_HD A perturb_scale(A sq_norm, double sign_rho, double perturb_eps) {
  const A r = A(1) / (std::sqrt(sq_norm) + A(perturb_eps));
  return r * A(sign_rho);
}

// x0 + scale * v [* x0^2 when adaptive]: the perturbed point, before rounding.
template <typename M, bool ADAPTIVE>
SASSHA_HD M perturb_value(M x0, M v, M scale) {
  M e = v * scale;
  if (ADAPTIVE) e = e * (x0 * x0);
  return x0 + e;
}

// ---- finite differences ------------------------------------------------------------
// One term folded into the running sum: (g - baseline) * z * coefficient / delta,
// rounded as the update's quotient (y - g) * z / delta when the coefficient is 1.
template <typename M>
SASSHA_HD M fd_term(M g, M baseline, M z, M coefficient, M delta) {
  return (g - baseline) * z * coefficient / delta;
}

// ---- the update ---------------------------------------------------------------------
// One tensor's row of the update-scalar table, cast to the math dtype M.
template <typename M>
struct UpdateScalars {
  M neg_step;  // -lr / (1 - beta1^t)
  M decay;     // 1 - lr * weight_decay
  M beta1, one_minus_beta1, beta2, one_minus_beta2;
  M c2;        // (1 - beta2^t)^p
  M eps;       // added after the power
  M power;     // hessian_power (passed once per call)
  bool live;   // false: restore x_t, state untouched
};

template <typename M>
SASSHA_HD UpdateScalars<M> update_scalars(const double* row, double power) {
  UpdateScalars<M> u;
  u.neg_step = static_cast<M>(row[UpdateCol::kNegStep]);
  u.decay = static_cast<M>(row[UpdateCol::kDecay]);
  u.beta1 = static_cast<M>(row[UpdateCol::kBeta1]);
  u.one_minus_beta1 = static_cast<M>(row[UpdateCol::kOneMinusBeta1]);
  u.beta2 = static_cast<M>(row[UpdateCol::kBeta2]);
  u.one_minus_beta2 = static_cast<M>(row[UpdateCol::kOneMinusBeta2]);
  u.c2 = static_cast<M>(row[UpdateCol::kC2]);
  u.eps = static_cast<M>(row[UpdateCol::kEps]);
  u.power = static_cast<M>(power);
  u.live = row[UpdateCol::kLive] > 0;
  return u;
}

// D^p: the sqrt fast path for the default p = 0.5 (as torch's pow does).
template <typename M, bool SQRT_POWER>
SASSHA_HD M hessian_power(M d, M power) {
  if (SQRT_POWER) return std::sqrt(d);
  return std::pow(d, power);
}

// D_t = beta2 D_{t-1} + (1 - beta2) |h_t|
template <typename M>
SASSHA_HD M hessian_ema(M d, M h, const UpdateScalars<M>& s) {
  return d * s.beta2 + std::fabs(h) * s.one_minus_beta2;
}

// x_{t+1} = x_t (1 - lr wd) - lr / (1 - beta1^t) * m_t / (pre + eps), pre = D^p / c2,
// m_t = beta1 m + (1 - beta1) g: returns x_{t+1} and writes m_t to ``m``.
template <typename M>
SASSHA_HD M sassha_update_pre(M x, M& m, M pre, M g, const UpdateScalars<M>& s) {
  m = m * s.beta1 + g * s.one_minus_beta1;
  const M denom = pre + s.eps;
  return x * s.decay + s.neg_step * (m / denom);
}

// The same with the preconditioner from D:
//   x_{t+1} = x_t (1 - lr wd) - lr / (1 - beta1^t) * m_t / (D^p / c2 + eps)
template <typename M, bool SQRT_POWER>
SASSHA_HD M sassha_update(M x, M& m, M d, M g, const UpdateScalars<M>& s) {
  return sassha_update_pre<M>(x, m, hessian_power<M, SQRT_POWER>(d, s.power) / s.c2, g, s);
}


// ---- compact state (sassha_fused/encoding.py) -------------------------------------------
// state_bits 8: groups of kGroup consecutive elements (row-major, from each tensor's
// element 0) share one float32 scale; both as 8-bit codes on a grid of the scale.
//  * m (int8): scale s = max |m| (a NaN wins); r = 1 / s once per group (0 when s is below
//    float32's smallest normal, kTiny, where 1 / s could overflow: the group encodes as 0);
//    square-root companding c = sqrt(|m| r), q = sign(m) min(floor((c + M_HALF) 127), 127).
//    Decoded by products only: t = q * (1/127), m = (t |t|) s.
//  * D (uint8) through its root R = sqrt(D): scale s = max R, c = R / s (0 when s is 0; one
//    division per element, paid on refresh steps only, the only steps that encode D),
//    q = min(floor((c + D_HALF) 255), 255), at least 1 where D > 0. Decoded: the root
//    (q * (1/255)) s, D its square. With the default hessian_power 0.5 and no refresh in the
//    step, the update's preconditioner sqrt(D) / c2 comes straight from the codes:
//    hessian_root(q, s / c2) = (q * (1/255)) (s / c2), with s / c2 once per group (c2 in
//    float32; eager.preconditioner), then + eps: one product per element, no decode of D.
// state_bits 16: bfloat16 (the callers' own round-to-nearest-even conversion).
// Every operation below is one IEEE operation rounded on its own, in the order of
// encoding.py, and none adds to a product (so no compiler contracts one into a fused
// multiply-add): given the same float32 values every backend writes the same codes.
// The 8-bit encodings are float32 whatever the math dtype (encoding.py rounds to
// float32 first).
constexpr int kGroup = 32;  // encoding.GROUP: elements per scale, one probe word
static_assert(kGroup == kProbeWordBits, "a group of the 8-bit state is one probe word");
constexpr float kMLevels = 127.0f;  // encoding.M_LEVELS
constexpr float kDLevels = 255.0f;  // encoding.D_LEVELS
// encoding.M_HALF / D_HALF (Python floats) as torch applies them to a float32 tensor
constexpr float kMHalf = static_cast<float>(0.5 / 127.0);
constexpr float kDHalf = static_cast<float>(0.5 / 255.0);
// encoding.M_UNIT / D_UNIT: the decodes' factors, the float32 values nearest 1/127 and 1/255
constexpr float kMUnit = static_cast<float>(1.0 / 127.0);
constexpr float kDUnit = static_cast<float>(1.0 / 255.0);
// encoding.TINY: float32's smallest normal, 2^-126
constexpr float kTiny = 1.17549435082228750797e-38f;

// Scales per tensor of n elements (encoding.n_groups).
SASSHA_HD int64_t n_groups(int64_t n) { return (n + kGroup - 1) / kGroup; }

// The group maximum as torch's amax takes it: a NaN wins (and stays). Bitwise | rather
// than ||: a select, no branch (the CPU loops vectorise).
SASSHA_HD float nan_max(float a, float b) { return ((b > a) | (b != b)) ? b : a; }

// floor(x) for 0 <= x < 2^31, as a truncation to int32: the encodings' x lie in [0, 256),
// where both are exact and equal. (A vectorised floor needs -fno-trapping-math from GCC; the
// truncating conversion vectorises everywhere.) The codes are then clamped and selected as
// int32, not as floats: GCC turns a float clamp followed by the conversion into branches
// and leaves the loop scalar.
SASSHA_HD int32_t floor_nonneg(float x) { return static_cast<int32_t>(x); }
SASSHA_HD int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
SASSHA_HD int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

// A float32 product rounded on its own, for the decodes: nvcc contracts a product that is
// then added to (hessian_root's preconditioner + eps) into a fused multiply-add unless
// told not to. (GCC would too, but the CPU loops are built for targets without FMA.)
SASSHA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// The factor r of a group of m whose scale is s = max |m| (encoding.encode_momentum): 1 / s,
// or 0 when s is below kTiny (or NaN). Once per group.
SASSHA_HD float m_scale_reciprocal(float s) { return s >= kTiny ? 1.f / s : 0.f; }

// m (float32) -> its int8 code with the group's r = m_scale_reciprocal(s):
// c = sqrt(|m| r), q = sign(m) min(floor((c + M_HALF) * 127), 127).
SASSHA_HD int8_t encode_m(float m, float r) {
  const float c = std::sqrt(std::fabs(m) * r);
  const int32_t q = min_i32(floor_nonneg((c + kMHalf) * kMLevels), 127);
  const int32_t neg = static_cast<int32_t>(0u - static_cast<uint32_t>(q));  // -q, no overflow for INT32_MIN
  return static_cast<int8_t>(m < 0.f ? neg : q);
}
// The code's value relative to its scale: t |t|, t = q * (1/127). decode_m = unit * s.
SASSHA_HD float decode_m_unit(int32_t q) {
  const float t = static_cast<float>(q) * kMUnit;
  return t * std::fabs(t);
}
SASSHA_HD float decode_m(int32_t q, float s) { return mul_rn(decode_m_unit(q), s); }

// D (float32, >= 0) and its root R = sqrt(D) -> its uint8 code in a group of scale s = max R
// (encoding.encode_hessian): c = R / s (0 when s is 0), q = min(floor((c + D_HALF) * 255), 255),
// at least 1 where D > 0. The division is per element (D is encoded on refresh steps only).
// It is taken whatever s is (by 1 when s is 0, then the 0 selected): a division only done
// under a condition is one GCC does not vectorise (it could trap), and the loop stays scalar.
SASSHA_HD uint8_t encode_d(float d, float root, float s) {
  const float quotient = root / (s > 0.f ? s : 1.f);
  const float c = s > 0.f ? quotient : 0.f;
  const int32_t q = min_i32(floor_nonneg((c + kDHalf) * kDLevels), 255);
  // at least 1 where D > 0, as a maximum: a select on (d > 0) & (q < 1) compiles to branches
  return static_cast<uint8_t>(max_i32(q, static_cast<int32_t>(d > 0.f)));
}
// The root's value relative to its scale: q * (1/255). hessian_root = unit * s.
SASSHA_HD float decode_d_unit(int32_t q) { return static_cast<float>(q) * kDUnit; }
// sqrt(D) from its code and the group's scale (encoding.hessian_root): (q * (1/255)) s.
// Called with s / c2 it is the preconditioner sqrt(D) / c2 of a step without refresh.
SASSHA_HD float hessian_root(int32_t q, float s) { return mul_rn(decode_d_unit(q), s); }
// D from its code and the group's scale (encoding.decode_hessian): the root squared.
SASSHA_HD float decode_d(int32_t q, float s) {
  const float root = hessian_root(q, s);
  return mul_rn(root, root);
}

// ---- master weights (master_weight_bits, bfloat16 params) --------------------------------
SASSHA_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
SASSHA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// float32 -> bfloat16 bits, round to nearest even, a NaN to 0x7FC0 (c10::BFloat16's rounding,
// which torch's .to(torch.bfloat16) uses).
SASSHA_HD uint16_t bf16_bits_rne(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// The float32 master weight of a bfloat16 param (its bits) and its correction
// (encoding.join_master): bits = (param << 16) + (correction << 8) for 24, + correction for 32.
template <int MW>
SASSHA_HD float join_master(uint16_t param_bits, int32_t correction) {
  static_assert(MW == 24 || MW == 32, "master_weight_bits is 24 or 32");
  const uint32_t rest = static_cast<uint32_t>(MW == 24 ? correction * 256 : correction);
  return bits_float((static_cast<uint32_t>(param_bits) << 16) + rest);
}

// A float32 master weight -> the bfloat16 param's bits and the correction
// (encoding.split_master): for 24 the bits are first rounded to 24 (+0x80, low byte
// cleared); the param is the top 16 bits rounded to nearest, ties away from zero
// (+0x8000); the correction the signed rest (>> 8 for 24). Non-finite values: the
// param's plain bfloat16 rounding, correction 0.
template <int MW>
SASSHA_HD void split_master(float x, uint16_t& param_bits, int32_t& correction) {
  static_assert(MW == 24 || MW == 32, "master_weight_bits is 24 or 32");
  // selects, not branches: the CPU loops vectorise
  uint32_t b = float_bits(x);
  const bool finite = (b & 0x7F800000u) != 0x7F800000u;
  if (MW == 24) b = (b + 0x80u) & 0xFFFFFF00u;
  const uint32_t high = (b + 0x8000u) >> 16;
  const int32_t rest = static_cast<int32_t>(b - (high << 16));  // in [-0x8000, 0x7FFF]
  param_bits = finite ? static_cast<uint16_t>(high) : bf16_bits_rne(x);
  correction = finite ? (MW == 24 ? rest / 256 : rest) : 0;  // a multiple of 256 for 24: exact
}

}  // namespace sassha
