// RMSNorm for bf16 on x86 CPUs with AVX-512 BF16: ppl_harness::rms_norm.
//
// x [..., H] bf16, weight [H] bf16 -> weight * bf16(x * rsqrt(mean(x^2) + eps)): transformers'
// LlamaRMSNorm as eager bf16 rounds it (x in float32, its normalised value rounded to bf16, then
// the product with the weight rounded to bf16). Inductor's fused kernel for it ran at ~2.5x the
// time of a copy of the same bytes; here one pass reads a row (summing its squares over 16
// float32 lanes), a second, from cache, writes it. The sum's order is the kernel's own, so the
// float32 mean may differ from eager's in its last bit: an output element then differs by one
// bf16 unit only where that bit decides its rounding (rare).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <tuple>

namespace {

using at::Tensor;
using bf16 = at::BFloat16;

inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

inline __m512 round_bf16(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }

// The norm of x (+ r where given: the residual sum, rounded to bf16 as eager's add rounds it,
// written to sum) into out; all [rows, H] contiguous.
void norm_rows(const bf16* xp, const bf16* rp, const bf16* wp, int64_t rows, int64_t H, float e, bf16* sp, bf16* op) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bf16* row = xp + i * H;
      if (rp) {  // row = bf16(x + r), written out: the layer's new residual stream
        bf16* s = sp + i * H;
        for (int64_t d = 0; d < H; d += 16) {
          const __m512 a = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d)));
          const __m512 b = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rp + i * H + d)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + d), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(a, b)));
        }
        row = s;
      }
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < H; d += 16) {
        const __m512 v = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d)));
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float var = _mm512_reduce_add_ps(acc) / (float)H;
      const __m512 r = _mm512_set1_ps(1.f / std::sqrt(var + e));
      bf16* dst = op + i * H;
      for (int64_t d = 0; d < H; d += 16) {
        const __m512 v = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d)));
        const __m512 w = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + d)));
        const __m512 y = _mm512_mul_ps(w, round_bf16(_mm512_mul_ps(v, r)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)_mm512_cvtneps_pbh(y));
      }
    }
  });
}

void check(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
              x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1) && x.size(-1) % 16 == 0,
              "rms_norm: bf16 CPU x [..., H] and weight [H], H a multiple of 16");
}

Tensor rms_norm(const Tensor& x_in, const Tensor& weight_in, double eps) {
  check(x_in, weight_in);
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  norm_rows(x.data_ptr<bf16>(), nullptr, weight.data_ptr<bf16>(), rows, H, (float)eps, nullptr, out.data_ptr<bf16>());
  return out;
}

// (bf16(x + r), the norm of it): a decoder layer's residual add and the norm after it, in one pass.
std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x_in, const Tensor& r_in, const Tensor& weight_in, double eps) {
  check(x_in, weight_in);
  TORCH_CHECK(r_in.sizes() == x_in.sizes() && r_in.scalar_type() == at::kBFloat16, "add_rms_norm: x and r of one shape, bf16");
  const Tensor x = x_in.contiguous(), r = r_in.contiguous(), weight = weight_in.contiguous();
  Tensor sum = at::empty(x.sizes(), x.options()), out = at::empty(x.sizes(), x.options());
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  norm_rows(x.data_ptr<bf16>(), r.data_ptr<bf16>(), weight.data_ptr<bf16>(), rows, H, (float)eps, sum.data_ptr<bf16>(),
            out.data_ptr<bf16>());
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ppl_harness, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor r, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ppl_harness, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}
