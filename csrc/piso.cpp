// PiSO ops, device-agnostic (ATen) orchestration registered for CPU and CUDA:
//   optimal_scales  channel-wise exact PiSO, group-wise PiSO_I / PiSO_S (ALGORITHM.md §2, §3)
//   quantize_rtn    round-to-nearest at given scales
//   _piso_sweep     the raw breakpoint sweep (detail::sweep), for tests and for the GPTQ/Qronos code
//
// Numerical contract (ARCHITECTURE.md §2):
// - Breakpoint keys, alpha = q^T lin, beta = q^T H q and h = H q are float64 (bf16/fp16 W are
//   converted to float32 values first, exactly; float32 H/G are widened to float64 exactly).
// - Returned scales are float64 for float64 W, else float32. The value returned, in that dtype, lies
//   strictly inside its interval (a margin of a few fp64 ulps from either breakpoint, see
//   piso_internal.h) and the objective the sweep reports is evaluated at exactly that value.
// - RTN rule used everywhere (quantize_rtn, the fallbacks, PiSO_S updates, GPTQ): codes =
//   clamp(round_half_even(fl64(w / s)), qmin, qmax) with w and s widened to float64. A scale strictly
//   inside an interval therefore reproduces exactly that interval's codes.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "piso_core.h"
#include "piso_internal.h"

namespace piso {
namespace detail {
namespace {

// Rows per event-parallel batch: keeps the [rows, d * Lmax] key/sort/prefix tensors (~10 float64/int64
// temporaries) near 2^25 entries each.
int64_t event_parallel_rows(int64_t d, int64_t Lmax) {
  return std::max<int64_t>(1, (int64_t(1) << 25) / std::max<int64_t>(1, d * Lmax));
}

// E(s) = s^2 q^T H q - 2 s q^T lin at the given per-row scales (float64), q by the RTN rule above.
at::Tensor objective_at(const at::Tensor& W, const at::Tensor& lin, const at::Tensor& H,
                        const at::Tensor& s, int64_t qmin, int64_t qmax) {
  auto q = at::clamp(at::round(W / s.unsqueeze(1)), qmin, qmax);
  at::Tensor Hq;
  if (!H.defined()) {
    Hq = q;
  } else if (H.dim() == 1) {
    Hq = q * H.unsqueeze(0);
  } else {
    Hq = at::matmul(q, H);  // H symmetric
  }
  auto beta = (q * Hq).sum(1);
  auto alpha = (q * lin).sum(1);
  return s * s * beta - 2.0 * s * alpha;
}

// x * 2^e for an integer tensor e (broadcast against x), for any e: in steps of at most 2^+-1000,
// each factor made by std::ldexp (exact) and each product exact while the result stays normal.
at::Tensor mul_pow2(at::Tensor x, const at::Tensor& e_in) {
  auto e = e_in.to(at::kCPU, at::kLong).contiguous();
  int64_t* ep = e.data_ptr<int64_t>();
  for (bool any = true; any;) {
    any = false;
    auto f = at::empty(e.sizes(), e.options().dtype(at::kDouble));
    double* fp = f.data_ptr<double>();
    for (int64_t i = 0; i < e.numel(); ++i) {
      const int64_t step = std::max<int64_t>(-1000, std::min<int64_t>(1000, ep[i]));
      fp[i] = std::ldexp(1.0, static_cast<int>(step));
      ep[i] -= step;
      any = any || step != 0;
    }
    if (any) x = x * f.to(x.device());
  }
  return x;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sweep(const at::Tensor& W_in, const at::Tensor& lin_in,
                                         const at::Tensor& H_in, int64_t qmin, int64_t qmax,
                                         double eps, SweepAlgo algo) {
  TORCH_CHECK(W_in.dim() == 2, "W: expected a 2-D [R, d] tensor, got shape ", W_in.sizes());
  TORCH_CHECK(lin_in.sizes() == W_in.sizes(), "lin: expected shape ", W_in.sizes(), ", got ",
              lin_in.sizes());
  TORCH_CHECK(qmin < 0 && qmax > 0, "qmin/qmax: expected qmin < 0 < qmax, got [", qmin, ", ", qmax,
              "]");
  TORCH_CHECK(qmax <= 32767 && qmin >= -32768, "qmin/qmax: grid [", qmin, ", ", qmax,
              "] is too wide (at most 16 bits)");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0 && eps < 0.5, "eps: expected 0 <= eps < 0.5, got ",
              eps);
  const bool f32 = W_in.scalar_type() != at::kDouble;
  const int64_t R = W_in.size(0), d = W_in.size(1);
  const auto out_dtype = f32 ? at::kFloat : at::kDouble;
  if (R == 0) {
    return {at::empty({0}, W_in.options().dtype(out_dtype)),
            at::empty({0}, W_in.options().dtype(at::kDouble))};
  }
  // bf16/fp16 -> float32 -> float64 is exact.
  auto W = W_in.to(at::kDouble).contiguous();
  auto lin = lin_in.to(at::kDouble).contiguous();
  at::Tensor H;
  if (H_in.defined()) {
    TORCH_CHECK(H_in.dim() == 1 || H_in.dim() == 2, "H: expected [d] (diagonal) or [d, d], got ",
                H_in.sizes());
    TORCH_CHECK(H_in.size(0) == d && (H_in.dim() == 1 || H_in.size(1) == d), "H: expected size ", d,
                " to match W of shape ", W_in.sizes(), ", got ", H_in.sizes());
    TORCH_CHECK(H_in.scalar_type() == at::kFloat || H_in.scalar_type() == at::kDouble,
                "H: expected float32 or float64, got ", H_in.scalar_type());
    // Only the symmetric part of H enters q^T H q; the sweeps read rows of H as columns. Dense
    // float32 H stays float32 for the CPU sweep (half the memory traffic; widened exactly to fp64
    // inside).
    if (H_in.dim() == 2) H = symmetric_part(H_in.contiguous()).contiguous();
    else H = H_in.to(at::kDouble).contiguous();
  }

  // Range: float32 values fit the float64 sweep with room to spare, but a float64 row far from 1
  // (|w| ~ 1e-200 or 1e160) underflows or overflows s^2 q^T H q. Such rows, and their linear terms,
  // are scaled by 2^-e (e: the exponent of max|w|), and H with the linear terms when max|H| or
  // max|lin| is far from 1: power-of-two scaling is exact, E scales by a constant per row, so the
  // sweep finds the same scales, multiplied back below. Rows within 2^+-256 are not touched.
  at::Tensor row_exp;  // per row e (0 = untouched), int32
  int64_t h_exp = 0;
  bool rows_scaled = false;
  if (!f32) {
    auto far = [](const at::Tensor& e) { return at::where(e.abs() > 256, e, at::zeros_like(e)); };
    row_exp = far(std::get<1>(at::frexp(W.abs().amax(1))));
    rows_scaled = row_exp.ne(0).any().item<bool>();
    if (rows_scaled) {
      W = mul_pow2(W, row_exp.neg().unsqueeze(1));
      lin = mul_pow2(lin, row_exp.neg().unsqueeze(1));
    }
    double m = lin.abs().max().item<double>();
    if (H.defined()) m = std::max(m, H.abs().max().item<double>());
    int e = 0;
    if (m > 0) std::frexp(m, &e);
    if (std::abs(e) > 256 && (!H.defined() || H.scalar_type() == at::kDouble)) {
      h_exp = e;
      const auto ne = at::full({}, -e, W.options().dtype(at::kInt));
      lin = mul_pow2(lin, ne);
      if (H.defined()) H = mul_pow2(H, ne);
    }
  }

  if (algo == SweepAlgo::Auto) algo = W.is_cpu() ? SweepAlgo::Sequential : SweepAlgo::EventParallel;
  SweepResult res;
  if (algo != SweepAlgo::EventParallel) {
    const int u_method = algo == SweepAlgo::SequentialPrefix   ? 1
                         : algo == SweepAlgo::SequentialEvents ? 2
                         : algo == SweepAlgo::SequentialTable  ? 3
                         : algo == SweepAlgo::SequentialPrefixBatched ? 4
                                                               : 0;
    if (W.is_cpu()) {
      res = sweep_sequential_cpu(W, lin, H, qmin, qmax, eps, f32, u_method);
    } else {
      // The sequential sweep is a CPU algorithm; on other devices it runs on a CPU copy.
      auto r = sweep_sequential_cpu(W.cpu(), lin.cpu(), H.defined() ? H.cpu() : H, qmin, qmax, eps, f32,
                                    u_method);
      res = {r.scale.to(W.device()), r.objective.to(W.device()), r.found.to(W.device())};
    }
  } else {
    // Dense float32 H stays float32 for the CUDA prefix kernel (read once per row: half the bytes).
    if (H.defined() && !(W.is_cuda() && H.dim() == 2)) H = H.to(at::kDouble);
    const int64_t rows = event_parallel_rows(d, std::max(qmax, -qmin));
    std::vector<at::Tensor> sc, ob, fo;
    for (int64_t r0 = 0; r0 < R; r0 += rows) {
      const int64_t n = std::min(rows, R - r0);
      auto r = sweep_event_parallel(W.narrow(0, r0, n), lin.narrow(0, r0, n), H, qmin, qmax, eps, f32);
      sc.push_back(r.scale);
      ob.push_back(r.objective);
      fo.push_back(r.found);
    }
    res = {at::cat(sc), at::cat(ob), at::cat(fo)};
  }

  // Fallbacks (ALGORITHM.md §2.6): all-zero row -> 1.0 (q = 0 at any scale, objective 0); no
  // candidate interval -> absmax max|w| / -qmin (2^(b-1), or 2^(b-1) - 1 on the narrow grid: the
  // absmax scale of gptq and the pipeline), with the objective evaluated at that scale in the
  // output dtype.
  auto scale = res.scale, obj = res.objective;
  auto missing = res.found.logical_not();
  if (missing.any().item<bool>()) {
    auto absmax = W.abs().amax(1) / static_cast<double>(-qmin);
    auto fb = at::where(absmax > 0, absmax, 1.0).to(out_dtype).to(at::kDouble);
    auto fb_obj = objective_at(W, lin, H.defined() ? H.to(at::kDouble) : H, fb, qmin, qmax);
    scale = at::where(missing, fb, scale);
    obj = at::where(missing, fb_obj, obj);
  }
  // The interval above the largest breakpoint 2 max|w| (every code 0, E = 0) is not one of the
  // sweep's intervals (beta = 0 there), but it is part of s > 0: where the sweep's best objective is
  // positive -- every nonzero quantization of the row is worse than none, which a cross term G or
  // PiSO_S's residual linear term can make so -- it wins. Its scale: 4 max|w|, strictly above every
  // breakpoint in the output dtype too (kept only where that holds, i.e. finite). Rows without a
  // candidate keep the absmax fallback above, as ALGORITHM.md §2.6 specifies.
  auto worse = obj.gt(0).logical_and(res.found);
  if (worse.any().item<bool>()) {
    auto amax = W.abs().amax(1);
    auto top = (amax * 4.0).to(out_dtype).to(at::kDouble);
    auto ok = worse.logical_and(top.gt(amax * 2.0)).logical_and(top.isfinite());
    scale = at::where(ok, top, scale);
    obj = at::where(ok, at::zeros_like(obj), obj);
  }
  if (rows_scaled || h_exp != 0) {
    // Back to the caller's units: s 2^e, E 2^(2e + h). (The fallback rows above used the scaled W
    // and lin too, so they are rescaled the same way.)
    scale = mul_pow2(scale, row_exp);
    obj = mul_pow2(obj, 2 * row_exp + h_exp);
  }
  return {scale.to(out_dtype), obj};
}

}  // namespace detail

namespace {

using OptT = std::optional<at::Tensor>;

detail::SweepAlgo parse_algo(c10::string_view s) {
  if (s == "auto") return detail::SweepAlgo::Auto;
  if (s == "sequential") return detail::SweepAlgo::Sequential;
  if (s == "event_parallel") return detail::SweepAlgo::EventParallel;
  if (s == "sequential_prefix") return detail::SweepAlgo::SequentialPrefix;
  if (s == "sequential_events") return detail::SweepAlgo::SequentialEvents;
  if (s == "sequential_table") return detail::SweepAlgo::SequentialTable;
  if (s == "sequential_prefix_batched") return detail::SweepAlgo::SequentialPrefixBatched;
  TORCH_CHECK(false, "algorithm: expected 'auto', 'sequential', 'event_parallel', 'sequential_prefix', "
              "'sequential_events', 'sequential_table' or 'sequential_prefix_batched', got '",
              std::string(s), "'");
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0 && eps < 0.5, "eps: expected 0 <= eps < 0.5, got ",
              eps);
}

void check_W(const at::Tensor& W) {
  check_defined(W, "W");
  check_dim(W, 2, "W");
  check_floating(W, "W");
  check_nonempty(W, "W");
  check_finite(W, "W");
}

// H: None | [D] | [D, D], float32/float64, finite, on W's device.
void check_H(const OptT& H, const at::Tensor& W, const char* name = "H") {
  if (!H.has_value()) return;
  const auto& h = *H;
  const int64_t D = W.size(1);
  check_defined(h, name);
  TORCH_CHECK((h.dim() == 1 && h.size(0) == D) || (h.dim() == 2 && h.size(0) == D && h.size(1) == D),
              name, ": expected shape [", D, "] (diagonal) or [", D, ", ", D, "] for W of shape ",
              W.sizes(), ", got ", h.sizes());
  check_accumulator(h, name);
  check_same_device(W, "W", h, name);
  check_finite(h, name);
}

void check_G(const OptT& G, const at::Tensor& W) {
  if (!G.has_value()) return;
  const auto& g = *G;
  const int64_t D = W.size(1);
  check_defined(g, "G");
  TORCH_CHECK(g.dim() == 2 && g.size(0) == D && g.size(1) == D, "G: expected shape [", D, ", ", D,
              "] for W of shape ", W.sizes(), ", got ", g.sizes());
  check_accumulator(g, "G");
  check_same_device(W, "W", g, "G");
  check_finite(g, "G");
}

// The linear term for rows X [n, m] against a block Gb [m, m] of G: (Gb x)_i = sum_j Gb[i, j] x_j.
at::Tensor apply_G(const at::Tensor& X, const at::Tensor& Gb) { return at::matmul(X, Gb.t()); }

// Diagonal block [k0, k0 + gs) of H (None stays None, 1-D is sliced).
at::Tensor block(const at::Tensor& H, int64_t k0, int64_t gs) {
  if (!H.defined()) return H;
  if (H.dim() == 1) return H.narrow(0, k0, gs);
  return H.narrow(0, k0, gs).narrow(1, k0, gs);
}

// Linear term of the single-block problem for rows X against the diagonal block of G (or of H when G
// is None): G_kk x for dense, H_ii x_i for diagonal, x for identity.
at::Tensor block_lin(const at::Tensor& X, const at::Tensor& Hb, const at::Tensor& Gb) {
  if (Gb.defined()) return apply_G(X, Gb);
  if (!Hb.defined()) return X;
  if (Hb.dim() == 1) return X * Hb.unsqueeze(0);
  return apply_G(X, Hb);
}

at::Tensor optimal_scales_impl(const at::Tensor& W_in, const OptT& H_opt, const OptT& G_opt,
                               int64_t bits, int64_t group_size, bool sequential, double eps,
                               bool narrow_range) {
  check_W(W_in);
  check_H(H_opt, W_in);
  check_G(G_opt, W_in);
  check_bits(bits);
  check_eps(eps);
  const int64_t N = W_in.size(0), D = W_in.size(1);
  const int64_t gs = check_group_size(group_size, D);
  const auto grid = int_grid(bits, narrow_range);
  const int64_t qmin = grid.first, qmax = grid.second;
  const bool f64 = W_in.scalar_type() == at::kDouble;
  // The values that are rounded: float64 stays, everything else becomes float32 exactly.
  const auto W = f64 ? W_in.contiguous() : W_in.to(at::kFloat).contiguous();
  const auto Wd = W.to(at::kDouble);
  // Hs: H in its own dtype, symmetrized (what the sweeps get); H: float64 (for the GEMMs). PiSO_I
  // reads only H's diagonal blocks: they are symmetrized and widened block by block below.
  at::Tensor Hs = H_opt.has_value() ? *H_opt : at::Tensor();
  const bool blocks_only = group_size != -1 && !sequential;
  if (Hs.defined() && Hs.dim() == 2 && !blocks_only) Hs = detail::symmetric_part(Hs);
  // PiSO_S with a cross term: a diagonal (or identity) H decouples the groups' quadratic terms but
  // not the linear ones, (G w)_k reads every group's weights. The sequential form then runs on the
  // dense diagonal matrix (the same objective; the dense sweep is exact for it).
  if (sequential && group_size != -1 && G_opt.has_value() && (!Hs.defined() || Hs.dim() == 1)) {
    Hs = Hs.defined() ? at::diag(Hs.to(at::kDouble))
                      : at::eye(D, W_in.options().dtype(at::kDouble));
  }
  const at::Tensor H = Hs.defined() && !(blocks_only && Hs.dim() == 2) ? Hs.to(at::kDouble) : Hs;
  const at::Tensor G = G_opt.has_value() ? G_opt->to(at::kDouble) : at::Tensor();
  const int64_t ng = D / gs;

  if (group_size == -1) {
    at::Tensor lin;
    if (G.defined()) lin = apply_G(Wd, G);
    else lin = block_lin(Wd, H, G);
    return std::get<0>(detail::sweep(W, lin, Hs, qmin, qmax, eps));
  }

  const bool dense = H.defined() && H.dim() == 2;
  auto out = at::empty({N, ng}, W.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (!sequential || !dense) {
    // PiSO_I (§3.1): every (row, group) is independent with the diagonal blocks H_kk, G_kk. Data-free
    // and diagonal H without G always take this form (the group problems are exactly decoupled).
    if (!H.defined() && !G.defined()) {
      auto Wr = W.reshape({N * ng, gs});
      return std::get<0>(detail::sweep(Wr, Wr.to(at::kDouble), H, qmin, qmax, eps)).reshape({N, ng});
    }
    for (int64_t k = 0; k < ng; ++k) {
      const int64_t k0 = k * gs;
      auto Hsb = block(Hs, k0, gs);
      if (Hsb.defined() && Hsb.dim() == 2) Hsb = detail::symmetric_part(Hsb.contiguous());
      auto Hb = Hsb.defined() ? Hsb.to(at::kDouble) : Hsb;
      auto Gb = G.defined() ? block(G, k0, gs) : G;
      auto lin = block_lin(Wd.narrow(1, k0, gs), Hb, Gb);
      out.select(1, k).copy_(std::get<0>(detail::sweep(W.narrow(1, k0, gs), lin, Hsb, qmin, qmax, eps)));
    }
    return out;
  }

  // PiSO_S (§3.2, standalone): groups in descending order of sum(diag H) over the group; group k
  // minimizes the full objective with processed groups at s_j q_j and unprocessed ones at their
  // original weights. r = G w - H w_hat is kept for all rows and updated with one GEMM per group:
  //   b_k = r_k + H_kk w_hat_k,     r -= (w_hat_k_new - w_hat_k_old) H[k-block, :]
  const auto& Gf = G.defined() ? G : H;
  auto r = apply_G(Wd, Gf) - at::matmul(Wd, H);
  auto importance = H.diagonal().reshape({ng, gs}).sum(1);
  auto order = std::get<1>(at::sort(importance.cpu(), /*stable=*/true, 0, /*descending=*/true));
  const auto ord = order.to(at::kLong);
  for (int64_t t = 0; t < ng; ++t) {
    const int64_t k = ord[t].item<int64_t>();
    const int64_t k0 = k * gs;
    auto Hb = block(H, k0, gs);
    auto wk = Wd.narrow(1, k0, gs);
    auto b = r.narrow(1, k0, gs) + at::matmul(wk, Hb);  // w_hat_k is still w_k (unprocessed)
    auto s = std::get<0>(detail::sweep(W.narrow(1, k0, gs), b, block(Hs, k0, gs), qmin, qmax, eps));
    out.select(1, k).copy_(s);
    auto sd = s.to(at::kDouble).unsqueeze(1);
    auto what = at::clamp(at::round(wk / sd), qmin, qmax) * sd;
    r.sub_(at::matmul(what - wk, H.narrow(0, k0, gs)));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_rtn_impl(const at::Tensor& W, const at::Tensor& scales,
                                                     int64_t bits, int64_t group_size,
                                                     bool narrow_range) {
  check_W(W);
  check_defined(scales, "scales");
  check_floating(scales, "scales");
  check_same_device(W, "W", scales, "scales");
  check_bits(bits);
  const int64_t N = W.size(0), D = W.size(1);
  const int64_t gs = check_group_size(group_size, D);
  const int64_t ng = D / gs;
  if (group_size == -1) {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N, "scales: expected shape [", N,
                "] (per channel) for W of shape ", W.sizes(), ", got ", scales.sizes());
  } else {
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == ng,
                "scales: expected shape [", N, ", ", ng, "] for W of shape ", W.sizes(),
                " and group_size ", group_size, ", got ", scales.sizes());
  }
  const auto s64 = scales.to(at::kDouble);
  TORCH_CHECK(at::logical_and(at::isfinite(s64), s64 > 0).all().item<bool>(),
              "scales: expected finite positive values (got a zero, negative, NaN or Inf scale)");
  const auto grid = int_grid(bits, narrow_range);
  // float64 division so that a scale strictly inside a PiSO interval reproduces its codes exactly.
  auto sfull = s64.reshape({N, ng, 1}).expand({N, ng, gs}).reshape({N, D});
  auto q = at::clamp(at::round(W.to(at::kDouble) / sfull), grid.first, grid.second);
  auto W_hat = (q * sfull).to(W.scalar_type());
  check_representable(W_hat, W.scalar_type());
  return {q.to(at::kChar), W_hat};
}

std::tuple<at::Tensor, at::Tensor> piso_sweep_impl(const at::Tensor& W, const at::Tensor& lin,
                                                   const OptT& H, int64_t qmin, int64_t qmax,
                                                   double eps, c10::string_view algorithm) {
  check_W(W);
  check_defined(lin, "lin");
  TORCH_CHECK(lin.sizes() == W.sizes(), "lin: expected the shape of W ", W.sizes(), ", got ",
              lin.sizes());
  check_floating(lin, "lin");
  check_same_device(W, "W", lin, "lin");
  check_finite(lin, "lin");
  check_H(H, W);
  check_eps(eps);
  const auto algo = parse_algo(algorithm);
  TORCH_CHECK(qmin < 0 && qmax > 0 && qmin >= -128 && qmax <= 127,
              "qmin/qmax: expected -128 <= qmin < 0 < qmax <= 127, got [", qmin, ", ", qmax, "]");
  const auto Wv = W.scalar_type() == at::kDouble ? W : W.to(at::kFloat);
  return detail::sweep(Wv, lin, H.has_value() ? *H : at::Tensor(), qmin, qmax, eps, algo);
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CPU, m) {
  m.impl("optimal_scales", &optimal_scales_impl);
  m.impl("quantize_rtn", &quantize_rtn_impl);
  m.impl("_piso_sweep", &piso_sweep_impl);
}

#ifdef PISO_WITH_CUDA
TORCH_LIBRARY_IMPL(piso, CUDA, m) {
  m.impl("optimal_scales", &optimal_scales_impl);
  m.impl("quantize_rtn", &quantize_rtn_impl);
  m.impl("_piso_sweep", &piso_sweep_impl);
}
#endif

}  // namespace piso
