// SiLU(gate) x up for bf16 on x86 CPUs with AVX-512 BF16: ppl_harness::silu_mul.
//
// The Llama-style MLP's activation, down_proj(silu(gate_proj(x)) * up_proj(x)), as eager torch
// rounds it: silu(g) = g / (1 + e^-g) in float32, rounded to bf16; times up in float32, rounded
// to bf16. Inductor's fused kernel for it (Sleef's exponential and a division, float32) was a
// tenth of a compiled bf16 SmolLM2 layer's time; here the exponential is a degree-7 polynomial
// (relative error ~1e-7, float32's own) and the division a reciprocal with one Newton step, so
// an output differs from eager's only where float32's last bits decide a bf16 rounding (one
// unit, in ~0.05% of elements). gate and up: one shape, any layout (made contiguous); out: theirs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>

namespace {

using at::Tensor;
using bf16 = at::BFloat16;

// e^x as 2^round(t) times a polynomial of the rest, t = x log2 e; x is clamped to [-87, 200]:
// below, 1 + e^x is 1 in float32 anyway (and no result is denormal); above ~88.7 it is inf, as
// float32's own exponential gives.
inline __m512 exp_f32(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(200.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(1.5353362e-4f), _mm512_set1_ps(1.3398874e-3f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.24022651f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.69314718f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

inline __m512 round_bf16(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }

// 16 elements (m of them real): silu(g) rounded to bf16, times u, rounded to bf16.
inline __m256i silu_mul16(const bf16* g, const bf16* u, int64_t m) {
  const __mmask16 k = m == 16 ? (__mmask16)0xffff : (__mmask16)((1u << m) - 1);
  const __m512 x = widen(_mm256_maskz_loadu_epi16(k, g)), y = widen(_mm256_maskz_loadu_epi16(k, u));
  const __m512 d = _mm512_add_ps(exp_f32(_mm512_sub_ps(_mm512_setzero_ps(), x)), _mm512_set1_ps(1.f));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));  // one Newton step: float32's precision
  __m512 s = _mm512_mul_ps(x, r);
  const __mmask16 huge = _mm512_cmp_ps_mask(d, _mm512_set1_ps(__builtin_inff()), _CMP_EQ_OQ);
  if (huge) s = _mm512_mask_div_ps(s, huge, x, d);  // e^-g overflowed (g below ~-88.7): g / inf, as eager
  return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(round_bf16(s), y));  // silu rounded as eager rounds it, times up
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && gate.scalar_type() == at::kBFloat16 && up.scalar_type() == at::kBFloat16 &&
              gate.sizes() == up.sizes(), "silu_mul: bf16 CPU tensors of one shape");
  const Tensor g = gate.contiguous(), u = up.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  const bf16 *gp = g.data_ptr<bf16>(), *upp = u.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, (n + 15) / 16, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t base = i * 16, m = std::min<int64_t>(16, n - base);
      const __m256i o = silu_mul16(gp + base, upp + base, m);
      if (m == 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + base), o);
      else _mm256_mask_storeu_epi16(op + base, (__mmask16)((1u << m) - 1), o);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ppl_harness, m) {
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(ppl_harness, CPU, m) {
  m.impl("silu_mul", &silu_mul);
}
