// The CPU backend's kernels: the LoRA mixture as one fused pass over the tokens (kernels/cpu_backend.py).
//
//   T = tokens, N = adapters, r = rank (per adapter, <= r_max), k = adapters per token
//   for t in range(T):                              # split across OpenMP threads (torch's own pool)
//       for j in range(k):
//           e = idx[t, j]; if e < 0: continue
//           c = coef[t, j] * scales[e]
//           h[:ranks[e]] = c * P[e, :ranks[e]] @ x[t]          # shrink: ranks[e] dot products of length d_p
//           y[t] += h[:ranks[e]] @ Q[e, :ranks[e]]             # expand: ranks[e] axpys of length d_q
//
// Forward: x = layer input, P = A (N, r_max, d_in), Q = B's rows (N, r_max, d_out).
// Backward dx: x = grad, P = B's rows, Q = A (the same kernel with the factors swapped).
// Gate gradient: dw[t, j] = scales[e] * <P[e] @ x[t], R[e] @ g[t]>, the two shrinks of the backward.
//
// Each thread takes a range of tokens and sorts its (token, slot) pairs by adapter (counting sort): an
// adapter's factors are read from memory once per thread and stay in cache while its pairs stream by
// (without the sort, every pair re-reads 2 * r * d factor values from L2, which bounds the kernel on a CPU).
// An adapter's pairs run in tiles of four tokens, so each factor value loaded feeds four FMAs; a token that
// routes twice to one adapter (duplicate slots) is one tile entry with the summed coefficient.
//
// Design limits: float and double only (half types take the torch backend); rows of x, y, P, Q and R are
// contiguous (the launcher makes them so); r_max <= 1024 (k * r_max for the gate gradient); scratch per
// thread: its pairs' order (T * k / threads integers) and N + 1 counters, never (T, k, r, d) nor (T, k, d).
// Bad ids or ranks return an error code before anything is written (never an out-of-bounds read).

#include <omp.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxRows = 1024;   // rank rows of one adapter (k x rank for the gate gradient)

// out[i] = <rows[i], x> for i < n; eight rows per pass, so x is read once per eight dot products.
template <typename S>
inline void dot_rows(const S* x, const S* const* rows, int n, int64_t d, S* out) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const S *p0 = rows[i], *p1 = rows[i + 1], *p2 = rows[i + 2], *p3 = rows[i + 3];
    const S *p4 = rows[i + 4], *p5 = rows[i + 5], *p6 = rows[i + 6], *p7 = rows[i + 7];
    S s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t c = 0; c < d; ++c) {
      const S xc = x[c];
      s0 += xc * p0[c];
      s1 += xc * p1[c];
      s2 += xc * p2[c];
      s3 += xc * p3[c];
      s4 += xc * p4[c];
      s5 += xc * p5[c];
      s6 += xc * p6[c];
      s7 += xc * p7[c];
    }
    out[i] = s0, out[i + 1] = s1, out[i + 2] = s2, out[i + 3] = s3;
    out[i + 4] = s4, out[i + 5] = s5, out[i + 6] = s6, out[i + 7] = s7;
  }
  for (; i < n; ++i) {
    const S* p0 = rows[i];
    S s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t c = 0; c < d; ++c) s0 += x[c] * p0[c];
    out[i] = s0;
  }
}

// y += sum_i h[i] * rows[i]; eight rows per pass, so y is read and written once per eight rows.
template <typename S>
inline void axpy_rows(const S* h, const S* const* rows, int n, int64_t d, S* y) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const S *q0 = rows[i], *q1 = rows[i + 1], *q2 = rows[i + 2], *q3 = rows[i + 3];
    const S *q4 = rows[i + 4], *q5 = rows[i + 5], *q6 = rows[i + 6], *q7 = rows[i + 7];
    const S h0 = h[i], h1 = h[i + 1], h2 = h[i + 2], h3 = h[i + 3];
    const S h4 = h[i + 4], h5 = h[i + 5], h6 = h[i + 6], h7 = h[i + 7];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c)
      y[c] += ((h0 * q0[c] + h1 * q1[c]) + (h2 * q2[c] + h3 * q3[c])) +
              ((h4 * q4[c] + h5 * q5[c]) + (h6 * q6[c] + h7 * q7[c]));
  }
  for (; i + 4 <= n; i += 4) {
    const S *q0 = rows[i], *q1 = rows[i + 1], *q2 = rows[i + 2], *q3 = rows[i + 3];
    const S h0 = h[i], h1 = h[i + 1], h2 = h[i + 2], h3 = h[i + 3];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) y[c] += (h0 * q0[c] + h1 * q1[c]) + (h2 * q2[c] + h3 * q3[c]);
  }
  for (; i < n; ++i) {
    const S* q0 = rows[i];
    const S h0 = h[i];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) y[c] += h0 * q0[c];
  }
}

// Four tokens of one adapter at once: h[m][i] = <rows[i], xs[m]>, four rows per pass, so each factor value
// loaded feeds four FMAs (16 accumulators stay in registers).
template <typename S>
inline void dot_rows_x4(const S* const* xs, const S* const* rows, int n, int64_t d, S h[4][kMaxRows]) {
  const S *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const S *p0 = rows[i], *p1 = rows[i + 1], *p2 = rows[i + 2], *p3 = rows[i + 3];
    S a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
    S a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
    for (int64_t c = 0; c < d; ++c) {
      const S q0 = p0[c], q1 = p1[c], q2 = p2[c], q3 = p3[c];
      const S v0 = x0[c], v1 = x1[c], v2 = x2[c], v3 = x3[c];
      a00 += v0 * q0, a01 += v0 * q1, a02 += v0 * q2, a03 += v0 * q3;
      a10 += v1 * q0, a11 += v1 * q1, a12 += v1 * q2, a13 += v1 * q3;
      a20 += v2 * q0, a21 += v2 * q1, a22 += v2 * q2, a23 += v2 * q3;
      a30 += v3 * q0, a31 += v3 * q1, a32 += v3 * q2, a33 += v3 * q3;
    }
    h[0][i] = a00, h[0][i + 1] = a01, h[0][i + 2] = a02, h[0][i + 3] = a03;
    h[1][i] = a10, h[1][i + 1] = a11, h[1][i + 2] = a12, h[1][i + 3] = a13;
    h[2][i] = a20, h[2][i + 1] = a21, h[2][i + 2] = a22, h[2][i + 3] = a23;
    h[3][i] = a30, h[3][i + 1] = a31, h[3][i + 2] = a32, h[3][i + 3] = a33;
  }
  for (int m = 0; m < 4; ++m)
    if (i < n) dot_rows(xs[m], rows + i, n - i, d, h[m] + i);
}

// ys[m] += sum_i h[m][i] * rows[i] for four distinct rows ys[m]; four factor rows per pass.
template <typename S>
inline void axpy_rows_x4(const S h[4][kMaxRows], const S* const* rows, int n, int64_t d, S* const* ys) {
  S *y0 = ys[0], *y1 = ys[1], *y2 = ys[2], *y3 = ys[3];
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const S *q0 = rows[i], *q1 = rows[i + 1], *q2 = rows[i + 2], *q3 = rows[i + 3];
    const S* g0 = h[0] + i;
    const S* g1 = h[1] + i;
    const S* g2 = h[2] + i;
    const S* g3 = h[3] + i;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      const S b0 = q0[c], b1 = q1[c], b2 = q2[c], b3 = q3[c];
      y0[c] += (g0[0] * b0 + g0[1] * b1) + (g0[2] * b2 + g0[3] * b3);
      y1[c] += (g1[0] * b0 + g1[1] * b1) + (g1[2] * b2 + g1[3] * b3);
      y2[c] += (g2[0] * b0 + g2[1] * b1) + (g2[2] * b2 + g2[3] * b3);
      y3[c] += (g3[0] * b0 + g3[1] * b1) + (g3[2] * b2 + g3[3] * b3);
    }
  }
  for (int m = 0; m < 4; ++m)
    if (i < n) axpy_rows(h[m] + i, rows + i, n - i, d, ys[m]);
}

// 0 when every (token, slot) entry has a usable adapter id and rank, else an error code for the launcher.
// Run before anything is written, so a refused call leaves y as it was.
inline int check_entries(const int64_t* idx, const int32_t* ranks, int64_t entries, int64_t N, int r_max) {
  int status = 0;
  for (int64_t p = 0; p < entries; ++p) {
    const int64_t e = idx[p];
    if (e >= N || e < -1) {
      status |= 1;
    } else if (e >= 0 && (ranks[e] < 0 || ranks[e] > r_max)) {
      status |= 2;
    }
  }
  return status;
}

// Enough work to be worth waking the thread pool (about 20 us of one core).
inline bool parallel_worth(int64_t T, int64_t k, int64_t r, int64_t d) { return T * k * r * d > (1 << 18); }

// The (slot, rank) rows of token t, slot by slot: P rows and Q rows of its adapters (entries already
// checked). Returns their count.
template <typename S>
inline int token_rows(int64_t t, const int64_t* idx, const int32_t* ranks, int64_t k, const S* P,
                      int64_t p_adapter, int64_t p_row, const S* Q, int64_t q_adapter, int64_t q_row,
                      const S** p_rows, const S** q_rows) {
  int n = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx[t * k + j];
    if (e < 0) continue;
    for (int r = 0; r < ranks[e]; ++r, ++n) {
      p_rows[n] = P + e * p_adapter + r * p_row;
      q_rows[n] = Q + e * q_adapter + r * q_row;
    }
  }
  return n;
}

// One thread's share: tokens [t0, t1). Its (token, slot) pairs are sorted by adapter (a counting sort), and
// each adapter's pairs run back to back, so the adapter's factors stay in L1 / L2 while its pairs stream by.
// A token's pairs all belong to one thread: no two threads write the same row of y.
template <typename S>
void mixture_tokens(int64_t t0, int64_t t1, S* y, int64_t y_row, const S* x, int64_t x_row, const S* P,
                    int64_t p_adapter, int64_t p_row, const S* Q, int64_t q_adapter, int64_t q_row,
                    const S* scales, const int64_t* idx, const S* coef, const int32_t* ranks, int64_t k,
                    int64_t N, int64_t d_p, int64_t d_q) {
  std::vector<int64_t> start(N + 1, 0);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (idx[p] >= 0) ++start[idx[p] + 1];
  for (int64_t e = 0; e < N; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(start[N]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (idx[p] >= 0) order[fill[idx[p]]++] = p;
  const S* p_rows[kMaxRows];
  const S* q_rows[kMaxRows];
  S h[kMaxRows];
  S h4[4][kMaxRows];
  for (int64_t e = 0; e < N; ++e) {
    if (start[e] == start[e + 1]) continue;
    const int rank = ranks[e];
    for (int r = 0; r < rank; ++r) {
      p_rows[r] = P + e * p_adapter + r * p_row;
      q_rows[r] = Q + e * q_adapter + r * q_row;
    }
    // Tiles of four distinct tokens; a token routed twice to e (duplicate slots) is one entry with the
    // summed coefficient, so no tile writes one row of y twice.
    int64_t s = start[e];
    while (s < start[e + 1]) {
      int64_t tokens[4];
      S coefs[4];
      int m = 0;
      for (; m < 4 && s < start[e + 1]; ++m) {
        tokens[m] = order[s] / k;
        coefs[m] = 0;
        for (; s < start[e + 1] && order[s] / k == tokens[m]; ++s) coefs[m] += coef[order[s]] * scales[e];
      }
      if (m == 4) {
        const S* xs[4] = {x + tokens[0] * x_row, x + tokens[1] * x_row, x + tokens[2] * x_row,
                          x + tokens[3] * x_row};
        S* ys[4] = {y + tokens[0] * y_row, y + tokens[1] * y_row, y + tokens[2] * y_row, y + tokens[3] * y_row};
        dot_rows_x4(xs, p_rows, rank, d_p, h4);
        for (int u = 0; u < 4; ++u)
          for (int r = 0; r < rank; ++r) h4[u][r] *= coefs[u];
        axpy_rows_x4(h4, q_rows, rank, d_q, ys);
        continue;
      }
      for (int u = 0; u < m; ++u) {
        dot_rows(x + tokens[u] * x_row, p_rows, rank, d_p, h);
        for (int r = 0; r < rank; ++r) h[r] *= coefs[u];
        axpy_rows(h, q_rows, rank, d_q, y + tokens[u] * y_row);
      }
    }
  }
}

template <typename S>
int mixture(S* y, int64_t y_row, const S* x, int64_t x_row, const S* P, int64_t p_adapter, int64_t p_row,
            const S* Q, int64_t q_adapter, int64_t q_row, const S* scales, const int64_t* idx, const S* coef,
            const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max, int64_t d_p, int64_t d_q) {
  if (r_max > kMaxRows) return 3;
  const int status = check_entries(idx, ranks, T * k, N, r_max);
  if (status) return status;
#pragma omp parallel if (parallel_worth(T, k, r_max, d_p + d_q))
  {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    mixture_tokens(T * me / threads, T * (me + 1) / threads, y, y_row, x, x_row, P, p_adapter, p_row, Q,
                   q_adapter, q_row, scales, idx, coef, ranks, k, N, d_p, d_q);
  }
  return 0;
}

template <typename S>
int gate_grad(S* dw, const S* x, int64_t x_row, const S* g, int64_t g_row, const S* P, int64_t p_adapter,
              int64_t p_row, const S* R, int64_t r_adapter, int64_t r_row, const S* scales, const int64_t* idx,
              const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max, int64_t d_p, int64_t d_r) {
  if (k * r_max > kMaxRows) return 3;
  const int status = check_entries(idx, ranks, T * k, N, r_max);
  if (status) return status;
#pragma omp parallel for schedule(static) if (parallel_worth(T, k, r_max, d_p + d_r))
  for (int64_t t = 0; t < T; ++t) {
    const S* p_rows[kMaxRows];
    const S* r_rows[kMaxRows];
    S hx[kMaxRows], hg[kMaxRows];
    for (int64_t j = 0; j < k; ++j) dw[t * k + j] = 0;
    const int n = token_rows<S>(t, idx, ranks, k, P, p_adapter, p_row, R, r_adapter, r_row, p_rows, r_rows);
    if (n == 0) continue;
    dot_rows(x + t * x_row, p_rows, n, d_p, hx);
    dot_rows(g + t * g_row, r_rows, n, d_r, hg);
    int i = 0;
    for (int64_t j = 0; j < k; ++j) {            // rows come slot by slot, ranks[e] each
      const int64_t e = idx[t * k + j];
      if (e < 0) continue;
      S value = 0;
      for (int r = 0; r < ranks[e]; ++r, ++i) value += hx[i] * hg[i];
      dw[t * k + j] = value * scales[e];
    }
  }
  return 0;
}

}  // namespace

#define AM_EXPORT(S, suffix)                                                                                    \
  extern "C" int am_mixture_##suffix(S* y, int64_t y_row, const S* x, int64_t x_row, const S* P,             \
                                     int64_t p_adapter, int64_t p_row, const S* Q, int64_t q_adapter,          \
                                     int64_t q_row, const S* scales, const int64_t* idx, const S* coef,        \
                                     const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max,         \
                                     int64_t d_p, int64_t d_q) {                                               \
    return mixture<S>(y, y_row, x, x_row, P, p_adapter, p_row, Q, q_adapter, q_row, scales, idx, coef, ranks,  \
                      T, k, N, r_max, d_p, d_q);                                                               \
  }                                                                                                            \
  extern "C" int am_gate_grad_##suffix(S* dw, const S* x, int64_t x_row, const S* g, int64_t g_row,           \
                                       const S* P, int64_t p_adapter, int64_t p_row, const S* R,               \
                                       int64_t r_adapter, int64_t r_row, const S* scales, const int64_t* idx,  \
                                       const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max,       \
                                       int64_t d_p, int64_t d_r) {                                             \
    return gate_grad<S>(dw, x, x_row, g, g_row, P, p_adapter, p_row, R, r_adapter, r_row, scales, idx, ranks,  \
                        T, k, N, r_max, d_p, d_r);                                                             \
  }

AM_EXPORT(float, f32)
AM_EXPORT(double, f64)
