// alpha-entmax rows (1 < alpha < 2) by Newton's method on the threshold, one row per task: their supports
// (hf_eot_entmax_support_*, for the fused attention) or dense rows (hf_eot_entmax_dense_*, for the weights).
// The supports of sparsemax (alpha = 2) and 1.5-entmax are exact instead (solve_row_exact, below).
//
// Built and loaded by hf_eot/ops/_native.py (plain C ABI, no torch headers: it compiles in about a second).
// For a row of logits L (masked keys at -inf) with maximum m, X_j = (alpha - 1)(L_j - m) <= 0 and
// p_j = [X_j - tau]_+^r / Z, r = 1/(alpha - 1) (Peters, Niculae & Martins 2019, eq. (10)), tau the root of
// sum_j [X_j - tau]_+^r = 1.  Since tau >= -1, only the candidates X_j > -1 can be in the support: they are
// compacted first, and Newton runs on them alone, in the cache, with its own stopping test per row (the
// torch path runs every row of a block until the slowest has converged, one pass over memory per operation).
//
// Newton's iteration is that of hf_eot.ops.entmax._entmax_newton_threshold for alpha <= 2: on
// phi(tau) = ||[X - tau]_+||_r - 1, convex and decreasing, from tau = -1 (phi >= 0), so the iterates increase
// monotonically to the root; step (S - S^(1 - 1/r)) / T with S = sum t^r, T = sum t^(r - 1); a step leaving
// the bracket [lo, hi] is replaced by its midpoint; stop once the step is <= eps^(2/3) or after max_iters.
// Powers are exp(e log t) with t clamped at the smallest normal number and e log t at 0.9 log of it (no
// denormals, no log(0)), as hf_eot.ops.entmax._exp_log_power; entries with t <= 0 are 0.
//
// Compiled with -ffast-math for vectorised exp / log (glibc's libmvec): the inputs given here are finite
// (the caller checks each solved row's maximum; masked keys' -inf only meets comparisons and max, whose
// vector instructions handle it), and sums are reassociated, which changes them by round-off only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
struct Consts {
  static constexpr T tiny = std::numeric_limits<T>::min();
  static constexpr T eps = std::numeric_limits<T>::epsilon();
};

// t^e for t = x - tau > 0, 0 for t <= 0 (see the header).
template <typename T>
inline T positive_power(T x, T tau, T e, T min_log) {
  const T t = x - tau;
  const T p = std::exp(std::max(e * std::log(std::max(t, Consts<T>::tiny)), min_log));
  return t > T(0) ? p : T(0);
}

// S = sum_j t_j^r and T = sum_j t_j^(r - 1) over x[0, c), t = [x - tau]_+ (summed in double: one float32
// accumulator per SIMD lane drifts by ~1e-6 relative over 10^4-10^5 keys, torch's cascade sums do not).
template <typename T>
void newton_sums(const T* __restrict x, int64_t c, T tau, T rm1, T min_log, T& S_out, T& T_out) {
  double S = 0, Q = 0;
#pragma omp simd reduction(+ : S, Q)
  for (int64_t j = 0; j < c; ++j) {
    const T q = positive_power(x[j], tau, rm1, min_log);
    S += (x[j] - tau) * q;  // 0 where q is 0
    Q += q;
  }
  S_out = static_cast<T>(S);
  T_out = static_cast<T>(Q);
}

// x[j] <- [x_j - tau]_+^r, returning their sum (in double, as newton_sums).
template <typename T>
T write_powers(T* __restrict x, int64_t c, T tau, T r, T min_log) {
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < c; ++j) {
    x[j] = positive_power(x[j], tau, r, min_log);
    total += x[j];
  }
  return static_cast<T>(total);
}

// Keeps the candidates above tau (in order) and returns their number.  Newton's iterates stay left of the
// root (see the header), so the entries at or below an iterate are 0 at the root; this is done only while
// the iteration continues (an iterate that is not the last is left of the root by far more than
// round-off).
template <typename T>
int64_t drop_at_or_below(T* __restrict values, int32_t* __restrict keys, int64_t c, T tau) {
  int64_t kept = 0;
  for (int64_t j = 0; j < c; ++j) {  // branchless: the comparisons are unpredictable
    const T x = values[j];
    values[kept] = x;
    keys[kept] = keys[j];
    kept += x > tau;
  }
  return kept;
}

// Compacts a row's candidates X_j = (logits_j - row_max) * scale > -1 (the threshold is >= -1) in order:
// values into `values`, keys into `keys`; returns their number.
template <typename T>
int64_t compact_candidates(const T* __restrict logits, int64_t n, T row_max, T scale, T* __restrict values,
                           int32_t* __restrict keys) {
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j) {  // branchless, as drop_at_or_below
    const T x = (logits[j] - row_max) * scale;
    values[c] = x;
    keys[c] = static_cast<int32_t>(j);
    c += x > T(-1);
  }
  return c;
}

// One row: compacts its candidates X_j = (logits_j - row_max) * scale > -1 (values into `values`, keys into
// `keys`), solves for tau with alpha - 1 = am1, and leaves the support's weights and keys at the front of
// `values` and `keys`; returns the support's size.  (scale = am1 for raw logits; 1 for rows already shifted
// and scaled.)
template <typename T>
int64_t solve_row(const T* __restrict logits, int64_t n, T row_max, T scale, T am1, int64_t max_iters,
                  T* __restrict values, int32_t* __restrict keys, T& tau_out) {
  const T r = T(1) / am1, rm1 = r - T(1);
  const T min_log = T(0.9) * std::log(Consts<T>::tiny);
  const T tol = std::pow(Consts<T>::eps, T(2) / T(3));
  int64_t c = compact_candidates(logits, n, row_max, scale, values, keys);
  T tau = T(-1), lo = T(-1), hi = std::max(-std::pow(T(c), -am1), lo);
  for (int64_t it = 0; it < max_iters; ++it) {
    T S, Q;
    newton_sums(values, c, tau, rm1, min_log, S, Q);
    if (S >= T(1)) {
      lo = tau;
    } else {
      hi = tau;
    }
    T next = tau + (S - std::pow(S, T(1) - am1)) / Q;
    if (!(next >= lo && next <= hi)) next = (lo + hi) / T(2);
    const T step = std::abs(next - tau);
    tau = next;
    if (step <= tol) break;
    c = drop_at_or_below(values, keys, c, tau);
  }
  T total = write_powers(values, c, tau, r, min_log);
  const T inv_total = T(1) / (total > T(0) ? total : T(1));
  for (int64_t j = 0; j < c; ++j) values[j] *= inv_total;
  tau_out = tau;
  return drop_at_or_below(values, keys, c, T(0));
}

// Keeps the entries x > tau (in order; tau in double, so that no entry above it is lost to rounding tau to T),
// returning their number.
template <typename T>
int64_t keep_above(T* __restrict values, int32_t* __restrict keys, int64_t c, double tau) {
  int64_t kept = 0;
  for (int64_t j = 0; j < c; ++j) {  // branchless, as drop_at_or_below
    const T x = values[j];
    values[kept] = x;
    keys[kept] = keys[j];
    kept += static_cast<double>(x) > tau;
  }
  return kept;
}

// The exact maps' threshold over the candidates S = x[0, c), all above tau: closed = tau + u with d = x - tau,
//   sparsemax (p = [x - tau]_+):   sum_S (d - u) = 1,    u = (sum d - 1) / |S|;
//   1.5-entmax (p = [x - tau]_+^2): sum_S (d - u)^2 = 1, u = (sum d - sqrt((sum d)^2 - |S| (sum d^2 - 1))) / |S|
// (the smaller root); false if there is none.  Also gives sum d, sum d^2 and min x.  (No NaN or infinity
// here: the file is compiled with -ffast-math.)
template <typename T, bool Squared>
bool closed_form(const T* __restrict x, int64_t c, double tau, double& closed, double& s1_out, double& s2_out,
                 T& min_out) {
  double s1 = 0, s2 = 0;
  T mn = std::numeric_limits<T>::max();
#pragma omp simd reduction(+ : s1, s2) reduction(min : mn)
  for (int64_t j = 0; j < c; ++j) {
    const double d = static_cast<double>(x[j]) - tau;
    s1 += d;
    s2 += d * d;
    mn = std::min(mn, x[j]);
  }
  s1_out = s1;
  s2_out = s2;
  min_out = mn;
  const double size = static_cast<double>(c);
  if (!Squared) {
    closed = tau + (s1 - 1.0) / size;
    return true;
  }
  const double disc = s1 * s1 - size * (s2 - 1.0);
  closed = disc >= 0 ? tau + (s1 - std::sqrt(disc)) / size : tau;
  return disc >= 0;
}

// One row of sparsemax (Squared = false; x = L - m) or 1.5-entmax (Squared = true; x = (L - m) / 2), exactly:
// the threshold is the closed form over the final support, as the sort-based torch path computes it
// (Martins & Astudillo 2016, Algorithm 1; Peters, Niculae & Martins 2019, Algorithm 2), without a sort.  On the
// candidates x > -1 (tau >= -1), from tau = -1: if the closed form over the entries kept lies at or below
// their minimum, it is the root (sum_j p_j = 1 on them, 0 on those dropped, which lie at or below tau).
// Otherwise tau moves right, staying left of the root, and the entries at or below it are dropped:
//   sparsemax: to the closed form (Michelot 1986, "A finite algorithm for finding the projection of a
//     point onto the canonical simplex of R^n": the unclipped sum is <= the clipped one, so the closed
//     form over a superset of the support is left of the root; it drops at least the minimum entry);
//   1.5-entmax: by Newton's step on f(tau) = sum_j [x_j - tau]_+^2 - 1, convex and decreasing (a tangent
//     step from the left stays left).
// The weights are [x - tau]_+ or its square, without a normaliser (they sum to 1 by the closed form).
// Newton's iterates converge quadratically; after kExactMaxSteps (or a step below round-off: an entry
// within round-off of the root) the last closed form is taken after dropping the entries at or below it
// (an adversarial search by a review found at most 21 Newton steps, and 13 of Michelot's).
constexpr int kExactMaxSteps = 100;

template <typename T, bool Squared>
int64_t solve_row_exact(const T* __restrict logits, int64_t n, T row_max, T scale, T* __restrict values,
                        int32_t* __restrict keys, T& tau_out) {
  int64_t c = compact_candidates(logits, n, row_max, scale, values, keys);
  double tau = -1.0, closed, s1, s2;
  T mn;
  for (int step = 0;; ++step) {
    const bool root = closed_form<T, Squared>(values, c, tau, closed, s1, s2, mn);
    if (root && closed <= static_cast<double>(mn)) {
      tau = closed;
      break;
    }
    const double next = Squared ? tau + (s2 - 1.0) / (2.0 * s1) : closed;
    if (Squared && (step >= kExactMaxSteps || next - tau <= 4 * std::numeric_limits<double>::epsilon())) {
      if (root) c = keep_above(values, keys, c, closed);
      closed_form<T, Squared>(values, c, tau, closed, s1, s2, mn);
      tau = closed;
      break;
    }
    tau = next;
    c = keep_above(values, keys, c, tau);
  }
  // One refinement step on the final support.  The closed form sums d = x - tau from the last iterate
  // (-1 if accepted at once): with many entries near the maximum each d is about 1 and the sum's rounding
  // (about eps |S|) shifts tau; the weights' own sums (about 1) do not.  (Newton's step for 1.5-entmax;
  // exact for sparsemax.)
  double r1 = 0, r2 = 0;
#pragma omp simd reduction(+ : r1, r2)
  for (int64_t j = 0; j < c; ++j) {
    const double d = static_cast<double>(values[j]) - tau;
    r1 += d;
    r2 += d * d;
  }
  if (r1 > 0) tau += Squared ? (r2 - 1.0) / (2.0 * r1) : (r1 - 1.0) / static_cast<double>(c);
  for (int64_t j = 0; j < c; ++j) {
    const double d = std::max(static_cast<double>(values[j]) - tau, 0.0);
    values[j] = static_cast<T>(Squared ? d * d : d);
  }
  tau_out = static_cast<T>(tau);
  return drop_at_or_below(values, keys, c, T(0));
}

template <typename T>
void solve_rows(const T* logits, int64_t R, int64_t n, const T* row_max, const uint8_t* row_valid, double alpha,
                int64_t max_iters, T* values, int32_t* keys, int64_t* counts, T* tau, int threads) {
  const T am1 = static_cast<T>(alpha - 1.0);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
  for (int64_t i = 0; i < R; ++i) {
    if (row_valid != nullptr && !row_valid[i]) {
      counts[i] = 0;
      tau[i] = T(-1);
      continue;
    }
    const T* row = logits + i * n;
    T* v = values + i * n;
    int32_t* k = keys + i * n;
    if (alpha == 2.0) {
      counts[i] = solve_row_exact<T, false>(row, n, row_max[i], T(1), v, k, tau[i]);
    } else if (alpha == 1.5) {
      counts[i] = solve_row_exact<T, true>(row, n, row_max[i], T(0.5), v, k, tau[i]);
    } else {
      counts[i] = solve_row(row, n, row_max[i], am1, am1, max_iters, v, k, tau[i]);
    }
  }
}

template <typename T>
void solve_dense_rows(const T* X, int64_t R, int64_t n, const T* am1, int64_t max_iters, T* out, T* tau,
                      int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> values(n);
    std::vector<int32_t> keys(n);
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < R; ++i) {
      const int64_t s = solve_row(X + i * n, n, T(0), T(1), am1[i], max_iters, values.data(), keys.data(), tau[i]);
      T* __restrict row = out + i * n;
      std::fill(row, row + n, T(0));
      for (int64_t j = 0; j < s; ++j) row[keys[j]] = values[j];
    }
  }
}

template <typename T>
void gather_rows(const T* values, const int32_t* keys, const int64_t* crow, int64_t R, int64_t n, T* weights,
                 int64_t* out_keys, int64_t* out_rows, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < R; ++i) {
    const int64_t start = crow[i], count = crow[i + 1] - crow[i];
    std::memcpy(weights + start, values + i * n, count * sizeof(T));
    for (int64_t j = 0; j < count; ++j) {
      out_keys[start + j] = keys[i * n + j];
      out_rows[start + j] = i;
    }
  }
}

}  // namespace

extern "C" {

// Solves the R rows of `logits` (R, n) (row maxima `row_max` (R,), finite for the rows solved; rows with
// row_valid[i] == 0 get none, row_valid may be null): row i's support weights and keys go to the front of
// row i of `values` (R, n) and `keys` (R, n), its size to counts[i], its threshold to tau[i] (-1 for the
// rows not solved).
void hf_eot_entmax_support_f32(const float* logits, int64_t R, int64_t n, const float* row_max,
                               const uint8_t* row_valid, double alpha, int64_t max_iters, float* values,
                               int32_t* keys, int64_t* counts, float* tau, int threads) {
  solve_rows<float>(logits, R, n, row_max, row_valid, alpha, max_iters, values, keys, counts, tau, threads);
}

void hf_eot_entmax_support_f64(const double* logits, int64_t R, int64_t n, const double* row_max,
                               const uint8_t* row_valid, double alpha, int64_t max_iters, double* values,
                               int32_t* keys, int64_t* counts, double* tau, int threads) {
  solve_rows<double>(logits, R, n, row_max, row_valid, alpha, max_iters, values, keys, counts, tau, threads);
}

// Dense alpha-entmax rows of X (R, n), already shifted and scaled (X_j = (alpha_i - 1)(L_j - max L) clamped at
// -1, masked keys at -1), with alpha_i - 1 = am1[i] in (0, 1): out (R, n), thresholds tau (R,).
void hf_eot_entmax_dense_f32(const float* X, int64_t R, int64_t n, const float* am1, int64_t max_iters, float* out,
                             float* tau, int threads) {
  solve_dense_rows<float>(X, R, n, am1, max_iters, out, tau, threads);
}

void hf_eot_entmax_dense_f64(const double* X, int64_t R, int64_t n, const double* am1, int64_t max_iters,
                             double* out, double* tau, int threads) {
  solve_dense_rows<double>(X, R, n, am1, max_iters, out, tau, threads);
}

// Packs the supports left by hf_eot_entmax_support_*: row pointers crow (R + 1,) -> weights, keys and rows
// (crow[R],).
void hf_eot_gather_support_f32(const float* values, const int32_t* keys, const int64_t* crow, int64_t R, int64_t n,
                               float* weights, int64_t* out_keys, int64_t* out_rows, int threads) {
  gather_rows<float>(values, keys, crow, R, n, weights, out_keys, out_rows, threads);
}

void hf_eot_gather_support_f64(const double* values, const int32_t* keys, const int64_t* crow, int64_t R, int64_t n,
                               double* weights, int64_t* out_keys, int64_t* out_rows, int threads) {
  gather_rows<double>(values, keys, crow, R, n, weights, out_keys, out_rows, threads);
}

}  // extern "C"
