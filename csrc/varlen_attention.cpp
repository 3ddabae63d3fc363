// Varlen flash attention, CPU backend (issue 4).
//
// The flash-attention-2 algorithm (Dao, 2023, arXiv:2307.08691) for packed sequences in
// flash-attn's varlen layout: q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens int32.
// Work is split into (segment, head) items that threads pull from a shared counter (longest
// first), so one long sample next to many short ones does not leave a core idle. Inside an
// item, tiles of BLOCK x BLOCK scores are computed with oneDNN's brgemm micro-kernel
// (at::native::cpublas::brgemm, exported by libtorch) and softmax runs online per row, so
// memory stays linear in tokens: the largest temporary is one segment's dQ for the item.
//
// Inputs are copied once, head-major, into fp32 (fp64 for gradcheck) working buffers padded
// with kPad zero rows: every brgemm call then has one of three fixed shapes per head dim
// (no kernel generation per odd segment length) and may read past a segment's end into
// finite data whose weight is exactly zero. q is pre-multiplied by softmax_scale.
//
// Masking follows flash-attn's varlen semantics: query i of a segment with lengths (Lq, Lk)
// may see key j iff  i + Lk - Lq - left <= j <= i + Lk - Lq + right  (a negative bound means
// unbounded; causal means right = 0). A row with no visible key gets out = 0, lse = +inf.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kPad = 64;  // largest block size: rows of zero padding after each head

// Block size for a segment: short chat turns should not pay for 64 x 64 tiles.
inline int64_t block_for(int64_t len) { return len <= 16 ? 16 : (len <= 32 ? 32 : 64); }

// ---------------------------------------------------------------------------------------
// Tile GEMM: C[M,N] (ldc) = (accumulate ? C : 0) + A[M,K] (lda) * B[K,N] (ldb), row-major.

bool brgemm_works() {
  // brgemm needs oneDNN's ukernel API; probe once and fall back to plain loops without it.
  static const bool ok = [] {
    try {
      float a[4] = {1, 2, 3, 4}, b[4] = {1, 0, 0, 1}, c[4] = {0, 0, 0, 0};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, false);
      return c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

template <typename T>
void gemm_loops(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, T(0));
    for (int64_t p = 0; p < K; ++p) {
      const T a = A[i * lda + p];
      const T* b = B + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (brgemm_works()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
  } else {
    gemm_loops(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                 int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_loops(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------
// exp for the softmax rows: branch-free so the row loops vectorize (std::exp does not).

inline float exp_row(float x) {
  // Cephes expf: 2^n * p(r), n = round(x / ln 2), |r| <= ln2 / 2; relative error ~1e-7.
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : y * scale;
}

inline double exp_row(double x) { return std::exp(x); }

// Row kernels of the online softmax. Kept out of line: inlined into the tile loops GCC 12
// stopped vectorizing them (measured: scalar exp made the forward 2x slower).

// max(mx, s[0..n)).
template <typename T>
__attribute__((noinline)) T row_max(const T* s, int64_t n, T mx) {
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// s[j] = exp(s[j] - mx) in place; returns the sum.
template <typename T>
__attribute__((noinline)) T row_exp_sum(T* s, int64_t n, T mx) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T p = exp_row(s[j] - mx);
    s[j] = p;
    sum += p;
  }
  return sum;
}

// Backward: p[j] = exp(s[j] - lse) (s given in p), ds[j] = p[j] * (dp[j] - delta) (dp in ds).
template <typename T>
__attribute__((noinline)) void row_p_ds(T* p, T* ds, int64_t n, T lse, T delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T pj = exp_row(p[j] - lse);
    p[j] = pj;
    ds[j] = pj * (ds[j] - delta);
  }
}

// ---------------------------------------------------------------------------------------

struct Mask {
  int64_t offset;  // Lk - Lq: bottom-right alignment
  int64_t left, right;  // window; < 0 means unbounded
  int64_t Lk;
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + offset - left); }
  int64_t hi(int64_t i) const {  // inclusive
    return right < 0 ? Lk - 1 : std::min<int64_t>(Lk - 1, i + offset + right);
  }
};

struct Item {
  int64_t b, h, cost;
};

// (segment, head) items, most expensive first, for dynamic scheduling.
std::vector<Item> make_items(const int32_t* cu_q, const int32_t* cu_k, int64_t B, int64_t H) {
  std::vector<Item> items;
  items.reserve(B * H);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lq = cu_q[b + 1] - cu_q[b], Lk = cu_k[b + 1] - cu_k[b];
    if (Lq == 0) continue;
    for (int64_t h = 0; h < H; ++h) items.push_back({b, h, Lq * std::max<int64_t>(Lk, 1)});
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

template <typename F>
void run_items(const std::vector<Item>& items, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(items[i]);
  });
}

// (T, Hx, D) -> (Hx, T + kPad, D) working copy, zero padded, optionally scaled.
template <typename T>
at::Tensor head_major(const at::Tensor& x, double scale) {
  auto y = at::empty({x.size(1), x.size(0) + kPad, x.size(2)}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
  y.narrow(1, 0, x.size(0)).copy_(x.transpose(0, 1));
  if (scale != 1.0) y.narrow(1, 0, x.size(0)).mul_(scale);
  y.narrow(1, x.size(0), kPad).zero_();
  return y;
}

// (T, Hx, D) -> (Hx, D, T + kPad) working copy, zero padded.
template <typename T>
at::Tensor head_major_t(const at::Tensor& x) {
  auto y = at::empty({x.size(1), x.size(2), x.size(0) + kPad}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
  y.narrow(2, 0, x.size(0)).copy_(x.permute({1, 2, 0}));
  y.narrow(2, x.size(0), kPad).zero_();
  return y;
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_q, const at::Tensor& cu_k, double scale,
                                     int64_t left, int64_t right) {
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Tk = k.size(0), Hkv = k.size(1), group = H / Hkv;
  const int64_t B = cu_q.size(0) - 1;
  const auto st = c10::CppTypeToScalarType<T>::value;

  at::Tensor qh = head_major<T>(q, scale), kt = head_major_t<T>(k), vh = head_major<T>(v, 1.0);
  at::Tensor out = at::empty({Tq, H, D}, q.options().dtype(st));
  at::Tensor lse = at::empty({H, Tq}, q.options().dtype(st));
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  const int32_t* ck = cu_k.data_ptr<int32_t>();
  const T* Q = qh.data_ptr<T>();
  const T* KT = kt.data_ptr<T>();
  const T* V = vh.data_ptr<T>();
  T* O = out.data_ptr<T>();
  T* LSE = lse.data_ptr<T>();
  const int64_t ldq = Tq + kPad, ldk = Tk + kPad;
  const T inf = std::numeric_limits<T>::infinity();

  run_items(make_items(cq, ck, B, H), [&](const Item& it) {
    const int64_t sq = cq[it.b], sk = ck[it.b];
    const int64_t Lq = cq[it.b + 1] - sq, Lk = ck[it.b + 1] - sk;
    const int64_t h = it.h, hk = h / group, bs = block_for(std::max(Lq, Lk));
    const Mask mask{Lk - Lq, left, right, Lk};
    std::vector<T> S(bs * bs), acc(bs * D), m(bs), l(bs);
    const T* Qh = Q + h * ldq * D;
    const T* KTh = KT + hk * D * ldk;
    const T* Vh = V + hk * ldk * D;

    for (int64_t i0 = 0; i0 < Lq; i0 += bs) {
      const int64_t bq = std::min(bs, Lq - i0);
      std::fill(m.begin(), m.end(), -inf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t jlo = mask.lo(i0), jhi = mask.hi(i0 + bq - 1);
      for (int64_t j0 = (jlo / bs) * bs; j0 <= jhi; j0 += bs) {
        const int64_t bk = std::min(bs, Lk - j0);
        gemm(bs, bs, D, Qh + (sq + i0) * D, D, KTh + sk + j0, ldk, S.data(), bs, false);
        for (int64_t r = 0; r < bs; ++r) {
          T* s = S.data() + r * bs;
          const int64_t lo = std::max<int64_t>(mask.lo(i0 + r) - j0, 0);
          const int64_t hi = std::min<int64_t>(mask.hi(i0 + r) - j0 + 1, bk);
          if (r >= bq || lo >= hi) {
            std::fill(s, s + bs, T(0));
            continue;
          }
          const T mx = row_max(s + lo, hi - lo, m[r]);
          const T sum = row_exp_sum(s + lo, hi - lo, mx);
          std::fill(s, s + lo, T(0));
          std::fill(s + hi, s + bs, T(0));
          const T alpha = std::exp(m[r] - mx);  // 0 on the row's first visible block
          if (alpha != T(1)) {
            T* a = acc.data() + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
        }
        gemm(bs, D, bs, S.data(), bs, Vh + (sk + j0) * D, D, acc.data(), D, true);
      }
      for (int64_t r = 0; r < bq; ++r) {
        T* o = O + ((sq + i0 + r) * H + h) * D;
        const T* a = acc.data() + r * D;
        const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
        LSE[h * Tq + sq + i0 + r] = l[r] > T(0) ? m[r] + std::log(l[r]) : inf;
      }
    }
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------
// Backward: per item, key blocks outer (dK, dV tiles stay in cache), query blocks inner,
// dQ accumulated in an item-private buffer; no atomics, bit-for-bit deterministic.

template <typename T>
void transpose_tile(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) y[j * n + i] = x[i * n + j];
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& dout, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& lse_in,
                                      const at::Tensor& cu_q, const at::Tensor& cu_k,
                                      double scale, int64_t left, int64_t right) {
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Tk = k.size(0), Hkv = k.size(1), group = H / Hkv;
  const int64_t B = cu_q.size(0) - 1;
  const auto st = c10::CppTypeToScalarType<T>::value;

  at::Tensor qh = head_major<T>(q, scale), kh = head_major<T>(k, 1.0);
  at::Tensor kt = head_major_t<T>(k), vt = head_major_t<T>(v), doh = head_major<T>(dout, 1.0);
  // Delta = rowsum(dO * O): the FA2 pre-pass that turns softmax's backward into a row term.
  at::Tensor delta = (dout.to(st) * out.to(st)).sum(-1).t().contiguous();  // (H, Tq)
  at::Tensor lse = lse_in.to(st).contiguous();
  at::Tensor dq = at::zeros({Tq, H, D}, q.options().dtype(st));
  at::Tensor dk = at::zeros({Tk, H, D}, q.options().dtype(st));  // per q head; summed for GQA
  at::Tensor dv = at::zeros({Tk, H, D}, q.options().dtype(st));
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  const int32_t* ck = cu_k.data_ptr<int32_t>();
  const T *Q = qh.data_ptr<T>(), *K = kh.data_ptr<T>(), *KT = kt.data_ptr<T>();
  const T *VT = vt.data_ptr<T>(), *DO = doh.data_ptr<T>();
  const T *DELTA = delta.data_ptr<T>(), *LSE = lse.data_ptr<T>();
  T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>();
  const int64_t ldq = Tq + kPad, ldk = Tk + kPad;
  const T inf = std::numeric_limits<T>::infinity();

  run_items(make_items(cq, ck, B, H), [&](const Item& it) {
    const int64_t sq = cq[it.b], sk = ck[it.b];
    const int64_t Lq = cq[it.b + 1] - sq, Lk = ck[it.b + 1] - sk;
    const int64_t h = it.h, hk = h / group, bs = block_for(std::max(Lq, Lk));
    const Mask mask{Lk - Lq, left, right, Lk};
    const int64_t nq = (Lq + bs - 1) / bs;
    std::vector<T> P(bs * bs), dS(bs * bs), tile_t(bs * bs), dk_acc(bs * D), dv_acc(bs * D);
    std::vector<T> dq_acc(nq * bs * D, T(0));
    const T *Qh = Q + h * ldq * D, *DOh = DO + h * ldq * D;
    const T *Kh = K + hk * ldk * D, *KTh = KT + hk * D * ldk, *VTh = VT + hk * D * ldk;
    const T *lse_h = LSE + h * Tq + sq, *delta_h = DELTA + h * Tq + sq;

    for (int64_t j0 = 0; j0 < Lk; j0 += bs) {
      const int64_t bk = std::min(bs, Lk - j0);
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      for (int64_t i0 = 0; i0 < Lq; i0 += bs) {
        const int64_t bq = std::min(bs, Lq - i0);
        if (mask.lo(i0) > j0 + bk - 1 || mask.hi(i0 + bq - 1) < j0) continue;
        const T* Qi = Qh + (sq + i0) * D;
        const T* DOi = DOh + (sq + i0) * D;
        gemm(bs, bs, D, Qi, D, KTh + sk + j0, ldk, P.data(), bs, false);    // S
        gemm(bs, bs, D, DOi, D, VTh + sk + j0, ldk, dS.data(), bs, false);  // dP
        for (int64_t r = 0; r < bs; ++r) {
          T* p = P.data() + r * bs;
          T* ds = dS.data() + r * bs;
          const int64_t lo = std::max<int64_t>(mask.lo(i0 + r) - j0, 0);
          const int64_t hi = std::min<int64_t>(mask.hi(i0 + r) - j0 + 1, bk);
          if (r >= bq || lo >= hi || lse_h[i0 + r] == inf) {
            std::fill(p, p + bs, T(0));
            std::fill(ds, ds + bs, T(0));
            continue;
          }
          const T lse_r = lse_h[i0 + r], delta_r = delta_h[i0 + r];
          std::fill(p, p + lo, T(0));
          std::fill(ds, ds + lo, T(0));
          row_p_ds(p + lo, ds + lo, hi - lo, lse_r, delta_r);
          std::fill(p + hi, p + bs, T(0));
          std::fill(ds + hi, ds + bs, T(0));
        }
        transpose_tile(P.data(), tile_t.data(), bs);
        gemm(bs, D, bs, tile_t.data(), bs, DOi, D, dv_acc.data(), D, true);  // dV += P^T dO
        transpose_tile(dS.data(), tile_t.data(), bs);
        gemm(bs, D, bs, tile_t.data(), bs, Qi, D, dk_acc.data(), D, true);  // dK += dS^T q'
        gemm(bs, D, bs, dS.data(), bs, Kh + (sk + j0) * D, D, dq_acc.data() + i0 * D, D,
             true);  // dQ += dS K
      }
      for (int64_t r = 0; r < bk; ++r) {
        std::copy_n(dk_acc.data() + r * D, D, DK + ((sk + j0 + r) * H + h) * D);
        std::copy_n(dv_acc.data() + r * D, D, DV + ((sk + j0 + r) * H + h) * D);
      }
    }
    for (int64_t r = 0; r < Lq; ++r) {
      T* o = DQ + ((sq + r) * H + h) * D;
      const T* a = dq_acc.data() + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = a[d] * static_cast<T>(scale);
    }
  });
  if (group > 1) {
    dk = dk.view({Tk, Hkv, group, D}).sum(2);
    dv = dv.view({Tk, Hkv, group, D}).sum(2);
  }
  return {dq, dk, dv};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_q, const at::Tensor& cu_k) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "varlen_attention (cpp): q, k, v must be CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "varlen_attention (cpp): q, k, v must be (tokens, heads, head_dim)");
  TORCH_CHECK(k.sizes() == v.sizes(), "varlen_attention (cpp): k and v shapes differ");
  TORCH_CHECK(q.size(2) == k.size(2), "varlen_attention (cpp): q and k head_dim differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "varlen_attention (cpp): heads of q must be a multiple of heads of k/v");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt &&
                  cu_q.is_contiguous() && cu_k.is_contiguous() && cu_q.dim() == 1 &&
                  cu_q.sizes() == cu_k.sizes() && cu_q.size(0) >= 1,
              "varlen_attention (cpp): cu_seqlens must be contiguous int32 (batch+1,)");
}

}  // namespace

std::vector<at::Tensor> varlen_fwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_q,
                                   at::Tensor cu_k, double scale, int64_t left, int64_t right) {
  check_inputs(q, k, v, cu_q, cu_k);
  if (q.scalar_type() == at::kDouble) return forward_impl<double>(q, k, v, cu_q, cu_k, scale, left, right);
  return forward_impl<float>(q, k, v, cu_q, cu_k, scale, left, right);
}

std::vector<at::Tensor> varlen_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v,
                                   at::Tensor out, at::Tensor lse, at::Tensor cu_q,
                                   at::Tensor cu_k, double scale, int64_t left, int64_t right) {
  check_inputs(q, k, v, cu_q, cu_k);
  if (q.scalar_type() == at::kDouble)
    return backward_impl<double>(dout, q, k, v, out, lse, cu_q, cu_k, scale, left, right);
  return backward_impl<float>(dout, q, k, v, out, lse, cu_q, cu_k, scale, left, right);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyfast-tune varlen flash attention, CPU backend (see csrc/varlen_attention.cpp)";
  m.def("fwd", &varlen_fwd,
        "(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right) -> "
        "[out (total_q, H, D) fp32|fp64, lse (H, total_q)]");
  m.def("bwd", &varlen_bwd,
        "(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, "
        "window_right) -> [dq, dk, dv] fp32|fp64");
  m.def("uses_brgemm", &brgemm_works, "True when tiles go through oneDNN's brgemm");
}
