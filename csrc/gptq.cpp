// GPTQ and Qronos (ALGORITHM.md §5) with PiSO interleaved inside the correction loop (§4).
//
// The orchestration is written once with ATen ops and runs on any device: dead columns, column
// order, damping + Cholesky (with escalation), the factor (U = upper Cholesky factor of H^-1 on
// CUDA, V = U^-1 on CPU: see "Two forms of the sweep"), the lazy-batch block loop with its
// block-level GEMM, the scale updates of every `scales_update` mode and the Qronos
// first-column/ridge steps. Only the per-block column loop is a backend kernel (csrc/gptq.h;
// cpu/gptq_cpu.cpp, cuda/gptq_cuda.cu).
//
// Precision: the work dtype is float64 for float64 W and float32 otherwise (bf16/fp16 W are
// computed in float32); H and G are converted to it. Rounding is always decided in float64
// (q = clamp(nearbyint(w / s))) with s the returned scale value, so that W_hat = s * code exactly.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "gptq.h"
#include "piso_internal.h"
#include "torch_piso.h"

namespace piso {
namespace {

enum class Update { None, GroupAbsmax, Layer, LayerSequential, Group, GroupSequential, GroupDataFree };

Update parse_update(c10::string_view s) {
  const std::string v(s.data(), s.size());
  if (v == "none") return Update::None;
  if (v == "group_absmax") return Update::GroupAbsmax;
  if (v == "layer") return Update::Layer;
  if (v == "layer_sequential") return Update::LayerSequential;
  if (v == "group") return Update::Group;
  if (v == "group_sequential") return Update::GroupSequential;
  if (v == "group_data_free") return Update::GroupDataFree;
  TORCH_CHECK(false,
              "scales_update: expected one of none, group_absmax, layer, layer_sequential, group, "
              "group_sequential, group_data_free, got '",
              v, "'");
}

// Modes whose scales change during the sweep, at the first column of each group.
bool is_group_update(Update u) {
  return u == Update::GroupAbsmax || u == Update::Group || u == Update::GroupSequential ||
         u == Update::GroupDataFree;
}

constexpr int kMaxEscalations = 6;  // damping x10 per try: up to 1e6 x the requested damping
constexpr double kPisoEps = 1e-9;   // relative interval margin of the PiSO sweep (ALGORITHM §2.4)

// Everything the sweep needs, in processing (permuted) column order.
struct Ctx {
  const char* op;
  int64_t N, D, gs, ng, qmin, qmax;
  bool per_channel;
  Update update;
  at::ScalarType cd;   // work dtype
  at::ScalarType sd;   // scale dtype
  at::Tensor perm;     // [D] processing position -> natural column
  std::vector<int64_t> perm_host;
  at::Tensor Hp;       // [D, D] raw (undamped) H, permuted, work dtype
  at::Tensor Gp;       // [D, D] cross term permuted (GPTQ: same tensor as Hp)
  at::Tensor Wo;       // [N, D] original weights (dead columns zeroed), permuted; kept only when
                       // read after the sweep starts (setup's keep_original)
  at::Tensor Wp;       // [N, D] current weights, permuted (the sweep works in place)
  at::Tensor codes;    // [N, D] int8, permuted
  at::Tensor sw;       // [N, ng] float64 working scales (values representable in sd)
  at::Tensor col_group;
  at::Tensor row_loss;
  at::Tensor Err;
  // Left-looking form (CPU without group updates, see "Two forms of the sweep"): the factor is V,
  // Err holds the current block's Acc, Res the residuals of processed columns.
  bool left = false;
  at::Tensor Res;
  double lambda = 0.0;   // damping (GPTQ) / ridge (Qronos) in the factorization actually used
  bool fallback = false; // H never factored: U = I (plain RTN, no error diffusion)
};

// --------------------------------------------------------------------------------------------
// Argument checks (shared by gptq and qronos)
// --------------------------------------------------------------------------------------------
void check_square(const at::Tensor& H, int64_t D, const char* name) {
  check_defined(H, name);
  check_dim(H, 2, name);
  TORCH_CHECK(H.size(0) == D && H.size(1) == D, name, ": expected shape [", D, ", ", D,
              "] (D = W.size(1)), got ", H.sizes());
  check_accumulator(H, name);
}

void check_common(const at::Tensor& W, const at::Tensor& H, const at::Tensor* G, int64_t bits,
                  int64_t group_size, const std::optional<at::Tensor>& scales, int64_t block_size,
                  const std::optional<at::Tensor>& stats) {
  check_defined(W, "W");
  check_dim(W, 2, "W");
  check_floating(W, "W");
  check_nonempty(W, "W");
  check_bits(bits);
  const int64_t N = W.size(0), D = W.size(1);
  const int64_t gs = check_group_size(group_size, D);
  check_square(H, D, "H");
  check_same_device(W, "W", H, "H");
  if (G) {
    check_square(*G, D, "G");
    check_same_device(W, "W", *G, "G");
  }
  TORCH_CHECK(block_size >= 1, "block_size: expected a positive integer, got ", block_size);
  if (scales.has_value()) {
    const auto& s = *scales;
    check_defined(s, "scales");
    check_floating(s, "scales");
    check_same_device(W, "W", s, "scales");
    if (group_size == -1) {
      TORCH_CHECK(s.dim() == 1 && s.size(0) == N, "scales: expected shape [", N,
                  "] for per-channel quantization (group_size=-1), got ", s.sizes());
    } else {
      TORCH_CHECK(s.dim() == 2 && s.size(0) == N && s.size(1) == D / gs, "scales: expected shape [",
                  N, ", ", D / gs, "] for group_size=", gs, ", got ", s.sizes());
    }
    check_finite(s, "scales");
    TORCH_CHECK((s > 0).all().item<bool>(), "scales: expected strictly positive scales");
  }
  if (stats.has_value()) {
    const auto& st = *stats;
    check_defined(st, "stats");
    TORCH_CHECK(st.scalar_type() == at::kDouble && st.dim() == 1 && st.size(0) == 4,
                "stats: expected a float64 tensor of shape [4], got ", st.scalar_type(), " ",
                st.sizes());
    check_same_device(W, "W", st, "stats");
  }
  check_finite(W, "W");
  check_finite(H, "H");
  if (G) check_finite(*G, "G");
}

// --------------------------------------------------------------------------------------------
// Scales
// --------------------------------------------------------------------------------------------
// absmax baseline: max|w| / 2^(b-1) (narrow range: / (2^(b-1)-1)) per row and group; all-zero -> 1.
at::Tensor absmax_scales(const at::Tensor& W, int64_t gs, int64_t qmin, at::ScalarType sd) {
  const int64_t N = W.size(0), D = W.size(1);
  const auto Wg = W.reshape({N, D / gs, gs});  // max |w| = max(amax, -amin): no |W| temporary
  auto a = at::maximum(Wg.amax(2), Wg.amin(2).neg()).to(at::kDouble).div_(double(-qmin));
  a = at::where(a > 0, a, at::ones_like(a));
  return a.to(sd);
}

// Column order: natural; descending diag H (act_order); or the group-aware order of ALGORITHM §3.3
// (groups by descending sum of diag H, inside each group by descending diag H), which keeps every
// group contiguous so its scale can be fixed just before its first column. Stable sorts: equal
// diagonals keep natural order (deterministic, and what the reference does).
at::Tensor column_order(const at::Tensor& dH, int64_t gs, bool act_order, bool group_aware) {
  const int64_t D = dH.size(0);
  if (!act_order) return at::arange(D, dH.options().dtype(at::kLong));
  if (!group_aware || gs == D) return std::get<1>(at::sort(dH, /*stable=*/true, 0, true));
  const int64_t ng = D / gs;
  auto blocks = dH.reshape({ng, gs});
  auto gorder = std::get<1>(at::sort(blocks.sum(1), /*stable=*/true, 0, true));
  auto inner = std::get<1>(at::sort(blocks, /*stable=*/true, 1, true));
  return inner.index_select(0, gorder).add_(gorder.mul(gs).unsqueeze(1)).reshape({D});
}

// out[i, j] = M[rows[i], cols[j]] (rows undefined: i) for a 2-D M; on CPU in one pass into one new
// tensor (index_select along dim 1 is ~2x slower there, and two index_selects allocate twice).
at::Tensor gather2d(const at::Tensor& M, const at::Tensor& rows, const at::Tensor& cols) {
  if (!M.device().is_cpu()) {
    return (rows.defined() ? M.index_select(0, rows) : M).index_select(1, cols);
  }
  const auto Mc = M.contiguous();
  const auto cc = cols.contiguous();
  const auto rc = rows.defined() ? rows.contiguous() : rows;
  const int64_t R = Mc.size(0), D = Mc.size(1);
  auto out = at::empty({R, D}, Mc.options());
  const int64_t* cp = cc.data_ptr<int64_t>();
  const int64_t* rp = rc.defined() ? rc.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_ALL_TYPES(Mc.scalar_type(), "gather2d", [&] {
    const scalar_t* src = Mc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + (rp ? rp[r] : r) * D;
        scalar_t* o = dst + r * D;
        for (int64_t j = 0; j < D; ++j) o[j] = row[cp[j]];
      }
    });
  });
  return out;
}

at::Tensor gather_cols(const at::Tensor& M, const at::Tensor& idx) {
  return gather2d(M, at::Tensor(), idx);
}

// M[perm][:, perm].
at::Tensor permute_sym(const at::Tensor& M, const at::Tensor& perm) { return gather2d(M, perm, perm); }

// Scale update of the group occupying processing positions [g0, g0 + gs), just before its first
// column is quantized (ALGORITHM §4.3). `explicit_seq`: evaluate PiSO_S's linear term by its
// definition  b_k = (G w_orig)_k - sum_{j not in k} H_kj w_cur_j  (GPTQ fallback, Qronos group 0).
// Otherwise GPTQ's invariant is used: with U from H_d = H + lambda I, an OBS step on column i moves
// H_d w only in coordinates <= i (H_d U^T = U^-1 is upper triangular), so for a group not yet
// reached  (H w_cur)_k = (G w_orig)_k - lambda (w_cur_k - w_orig_k)  and
//   b_k = H_kk w_cur_k + lambda (w_cur_k - w_orig_k).
// The same holds for Qronos after its ridge re-solve (step 1b solves (H'+lambda I) v = G w + lambda w
// - H q0 on the remaining columns, i.e. (G w - H v)_k = lambda (v_k - w_k)). This costs O(N gs^2)
// per group instead of a [N, D] x [D, gs] GEMM, and avoids cancellation in float32.
void update_group_scale(Ctx& c, int64_t g0, bool explicit_seq) {
  const int64_t gs = c.gs;
  const int64_t k = c.perm_host[g0] / gs;  // natural group index
  // The group's current (error-diffused) weights (group modes use the right-looking form, which
  // keeps them in W: see "Two forms of the sweep").
  TORCH_INTERNAL_ASSERT(!c.left);
  auto wk = c.Wp.narrow(1, g0, gs).contiguous();
  at::Tensor s;
  if (c.update == Update::GroupAbsmax) {
    s = absmax_scales(wk, gs, c.qmin, c.sd).reshape({c.N});
  } else {
    auto w64 = wk.to(at::kDouble);
    auto Hkk = c.Hp.narrow(0, g0, gs).narrow(1, g0, gs);
    at::Tensor lin;
    std::optional<at::Tensor> Hs = Hkk;
    if (c.update == Update::GroupDataFree) {
      lin = w64;
      Hs = std::nullopt;
    } else if (c.update == Update::Group) {
      auto Gkk = c.Gp.narrow(0, g0, gs).narrow(1, g0, gs).to(at::kDouble);
      lin = at::mm(w64, Gkk.t());
    } else {  // GroupSequential
      auto H64 = Hkk.to(at::kDouble);
      if (explicit_seq) {
        auto Grow = c.Gp.narrow(0, g0, gs);  // [gs, D]
        auto Hrow = c.Hp.narrow(0, g0, gs);
        lin = at::mm(c.Wo, Grow.t()).to(at::kDouble);
        lin.sub_(at::mm(c.Wp, Hrow.t()).to(at::kDouble));
        lin.add_(at::mm(w64, H64.t()));
      } else {
        lin = at::mm(w64, H64.t());
        if (c.lambda != 0.0) {
          auto wo = c.Wo.narrow(1, g0, gs).to(at::kDouble);
          lin.add_(w64 - wo, c.lambda);
        }
      }
    }
    s = std::get<0>(piso_sweep(wk, lin, Hs, c.qmin, c.qmax, kPisoEps, "auto"));
  }
  c.sw.select(1, k).copy_(s.to(at::kDouble));
}

// Block boundaries from `start`: range(start, D, block_size), or, when scales change per group,
// boundaries on multiples of a block that is a whole number of groups (every group then lies inside
// one block, so its weights are fully error-diffused when its scale is computed).
std::vector<int64_t> block_bounds(const Ctx& c, int64_t start, int64_t block_size) {
  std::vector<int64_t> b{start};
  if (is_group_update(c.update) && c.gs < c.D) {
    const int64_t B = c.gs * std::max<int64_t>(1, block_size / c.gs);
    for (int64_t x = (start / B + 1) * B; x < c.D; x += B) b.push_back(x);
  } else {
    for (int64_t x = start + block_size; x < c.D; x += block_size) b.push_back(x);
  }
  b.push_back(c.D);
  return b;
}

// F: the sweep's factor (U, or V in the left-looking form).
void run_columns(Ctx& c, const at::Tensor& F, int64_t c0, int64_t c1, int64_t i1, int64_t i2) {
  // The left-looking kernel reads the block's diagonal block of V, row-major (V is a column-major
  // view): a copy of (i2 - i1)^2 elements.
  const auto Fk = c.left ? F.narrow(0, i1, i2 - i1).narrow(1, i1, i2 - i1).contiguous() : F;
  detail::ColumnSweepArgs a{c.Wp, Fk, c.Err, c.codes, c.sw, c.col_group, c.row_loss,
                            c0, c1, i1, i2, c.qmin, c.qmax, c.left, c.Res};
#ifdef PISO_WITH_CUDA
  if (c.Wp.is_cuda()) {
    detail::gptq_columns_cuda(a);
    return;
  }
#endif
  TORCH_CHECK(c.Wp.device().is_cpu(), c.op, ": no GPTQ column kernel for device ", c.Wp.device());
  detail::gptq_columns_cpu(a);
}

// Two forms of the sweep. GPTQ quantizes column i as it stands after the OBS updates of the
// columns before it, w_i = w0_i - sum_{k<i} err_k U_ki, with err_k = (w_k - s q_k) / U_kk and U the
// upper Cholesky factor of (H + lambda I)^-1.
// - Right-looking (the textbook's; the CUDA path): after each block, W[:, i2:] -= Err U[block, i2:].
//   Needs U, i.e. a triangular inverse (D^3/3 flops) on top of the Cholesky factorization.
// - Left-looking (CPU): let V = U^-1, so H + lambda I = V V^T with V upper triangular -- the flipped
//   Cholesky factor itself, no inverse. With the residuals r_m = w0_m - s q_m of processed columns,
//   err = r V (err U = r), and summing sum_{k<i} err_k U_ki = sum_m r_m sum_{m<=k<i} V_mk U_ki with
//   (V U)_mi = 0 for m < i gives
//       w_i = w0_i + (1/V_ii) sum_{m<i} r_m V_mi,
//   so each block starts from one GEMM, Acc = R[:, start:i1] V[start:i1, block], the kernel keeps Acc
//   up to date inside the block (Acc_j += r_i V_ij), and err_i = (w_i - s q_i) V_ii. W keeps w0 for
//   unprocessed columns.
// Both forms compute the same quantities up to rounding (tests compare them: PISO_GPTQ_FORM=right
// runs the right-looking form on CPU); the left one does about D^3/3 fewer flops. Modes that update
// group scales during the sweep stay right-looking: they need every unprocessed column's current
// value at each group start, which the left form has only through a solve with V's diagonal block
// (w0_g + Acc_g V_gg^-1), and in float32 that solve made distributed and single-process runs of the
// tiny test model flip PiSO's choice for a group (tests/test_distributed.py).
//
// The lazy-batch GPTQ sweep over processing positions [start, D) (ALGORITHM §5.1 step 5).
// Group scale updates fire at each group's first column (position multiple of gs).
// F is the factor of factor_matrix: U (right-looking) or V (left-looking, c.left).
void sweep(Ctx& c, const at::Tensor& F, int64_t start, int64_t block_size) {
  const auto bounds = block_bounds(c, start, block_size);
  int64_t E = 0;
  for (size_t t = 0; t + 1 < bounds.size(); ++t) E = std::max(E, bounds[t + 1] - bounds[t]);
  if (!c.left) c.Err = at::empty({c.N, E}, c.Wp.options());
  const bool groups = is_group_update(c.update);
  for (size_t t = 0; t + 1 < bounds.size(); ++t) {
    const int64_t i1 = bounds[t], i2 = bounds[t + 1];
    if (c.left) {
      // Corrections of every column processed before this block, in one GEMM.
      c.Err = i1 > start ? at::mm(c.Res.narrow(1, start, i1 - start),
                                  F.narrow(0, start, i1 - start).narrow(1, i1, i2 - i1))
                         : at::zeros({c.N, i2 - i1}, c.Wp.options());
    }
    int64_t c0 = i1;
    while (c0 < i2) {
      int64_t c1 = i2;
      if (groups) {
        if (c0 % c.gs == 0) update_group_scale(c, c0, /*explicit_seq=*/c.fallback);
        c1 = std::min(i2, (c0 / c.gs + 1) * c.gs);
      }
      run_columns(c, F, c0, c1, i1, i2);
      c0 = c1;
    }
    if (i2 < c.D && !c.left) {
      auto rest = c.Wp.narrow(1, i2, c.D - i2);
      rest.addmm_(c.Err.narrow(1, 0, i2 - i1), F.narrow(0, i1, i2 - i1).narrow(1, i2, c.D - i2),
                  1, -1);
    }
  }
}

// Tries factorizations with damping lambda0, then x10 steps; warns about escalation or failure.
// `factor(lambda)` returns true when it succeeded (and keeps what it computed).
template <class F>
bool factor_with_escalation(const char* op, double lambda0, double base, F&& factor,
                            double& used) {
  double lam = lambda0;
  for (int t = 0; t <= kMaxEscalations; ++t) {
    if (factor(lam)) {
      if (t > 0) {
        TORCH_WARN(op, ": H is not numerically positive definite with damping ", lambda0,
                   "; used damping ", lam, " (", lam / base, " x mean diag H) after ", t,
                   " escalation(s)");
      }
      used = lam;
      return true;
    }
    if (t < kMaxEscalations) lam = std::max(lam * 10.0, 1e-6 * base);
  }
  TORCH_WARN(op, ": H could not be factored even with damping ", lam, " (", lam / base,
             " x mean diag H); fell back to round-to-nearest with the current scales");
  used = lam;
  return false;
}

// Inverse of a lower-triangular L by 2x2 blocks, inv([[A, 0], [B, C]]) = [[A^-1, 0], [X, C^-1]] with
// X = -C^-1 (B A^-1) from one GEMM and one triangular solve: about D^3/2 flops, half of
// solve_triangular(L, I), which treats the identity as a dense right-hand side.
// Writes L^-1 into `out` (an n x n view, possibly strided): the diagonal blocks recursively in
// place, the off-diagonal block by one solve, so no block is computed into a temporary and copied.
void lower_tri_inverse_into(const at::Tensor& L, at::Tensor out) {
  const int64_t n = L.size(0);
  if (n <= 512) {
    out.copy_(at::linalg_solve_triangular(L, at::eye(n, L.options()), /*upper=*/false));
    return;
  }
  const int64_t h = n / 2;
  auto B = L.narrow(0, h, n - h).narrow(1, 0, h);
  auto C = L.narrow(0, h, n - h).narrow(1, h, n - h);
  auto oA = out.narrow(0, 0, h).narrow(1, 0, h);
  out.narrow(0, 0, h).narrow(1, h, n - h).zero_();
  lower_tri_inverse_into(L.narrow(0, 0, h).narrow(1, 0, h), oA);
  lower_tri_inverse_into(C, out.narrow(0, h, n - h).narrow(1, h, n - h));
  out.narrow(0, h, n - h).narrow(1, 0, h)
      .copy_(at::linalg_solve_triangular(C, at::mm(B, oA), /*upper=*/false).neg_());
}

at::Tensor lower_tri_inverse(const at::Tensor& L) {
  auto out = at::empty_like(L, at::MemoryFormat::Contiguous);
  lower_tri_inverse_into(L, out);
  return out;
}

// Lower Cholesky factor of J A J + lam I (J: the reversal), or undefined if it does not factor.
at::Tensor flipped_cholesky_lower(const at::Tensor& A, double lam) {
  auto Af = A.flip({0, 1});  // a new tensor: the damping goes on its diagonal
  if (lam != 0.0) Af.diagonal().add_(lam);
  auto r = at::linalg_cholesky_ex(Af, /*upper=*/false, /*check_errors=*/false);
  if (std::get<1>(r).item<int64_t>() != 0) return at::Tensor();
  return std::get<0>(r);
}

// In-place J X J of a contiguous square CPU matrix: its storage reversed.
void flip_square_inplace(at::Tensor& X) {
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "flip_inplace", [&] {
    scalar_t* p = X.data_ptr<scalar_t>();
    const int64_t m = X.numel();
    at::parallel_for(0, m / 2, 1 << 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) std::swap(p[k], p[m - 1 - k]);
    });
  });
}

// U = upper Cholesky factor of A^-1 (A symmetric positive definite), or undefined if A does not
// factor. With J the reversal permutation and J A J = L L^T:  A^-1 = (J L^-T J)(J L^-1 J), and
// J L^-1 J is upper triangular with positive diagonal, so it IS the upper Cholesky factor of A^-1.
// One Cholesky + one triangular solve replaces IST's chol -> cholesky_inverse -> chol (same result,
// one factorization fewer). The right-looking form's factor.
at::Tensor upper_chol_of_inverse(const at::Tensor& A, double lam = 0.0) {
  const auto L = flipped_cholesky_lower(A, lam);
  if (!L.defined()) return at::Tensor();
  auto U = lower_tri_inverse(L);  // contiguous
  if (U.device().is_cpu()) {
    flip_square_inplace(U);
  } else {
    U = U.flip({0, 1}).contiguous();
  }
  if (!all_finite(U)) return at::Tensor();
  return U;
}

// LAPACK's Cholesky (the copy inside libtorch_cpu that ATen itself calls).
extern "C" void spotrf_(char* uplo, int* n, float* a, int* lda, int* info);
extern "C" void dpotrf_(char* uplo, int* n, double* a, int* lda, int* info);

// V, upper triangular with positive diagonal, with A + lam I = V V^T (the left-looking form's
// factor; CPU), or undefined if it does not factor. V = U^-1 for the U above, but no inverse is
// formed: J (A + lam I) J = L L^T and V = J L J. LAPACK potrf('L') (the call ATen makes; MKL's
// blocked potrf rounds differently with the thread count, as the GEMMs do, so results are
// reproducible for a fixed thread count) factors the row-major B = J A J + lam I in place,
// read column-major (B^T = B); that leaves L^T in B's row-major upper triangle. Reversing the
// storage (X -> J X J) turns it into V^T in the lower triangle; the strict upper triangle (still
// holding entries of B) is zeroed, and V is returned as the transposed (column-major) view.
at::Tensor ul_factor_cpu(const at::Tensor& A, double lam) {
  TORCH_INTERNAL_ASSERT(A.device().is_cpu() && A.size(0) <= INT32_MAX);
  auto M = A.flip({0, 1}).contiguous();
  if (lam != 0.0) M.diagonal().add_(lam);
  char uplo = 'L';
  int n = static_cast<int>(M.size(0)), lda = std::max(1, n), info = 0;
  if (M.scalar_type() == at::kFloat) {
    spotrf_(&uplo, &n, M.data_ptr<float>(), &lda, &info);
  } else {
    TORCH_INTERNAL_ASSERT(M.scalar_type() == at::kDouble);
    dpotrf_(&uplo, &n, M.data_ptr<double>(), &lda, &info);
  }
  if (info != 0) return at::Tensor();
  flip_square_inplace(M);
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "zero_upper", [&] {
    scalar_t* p = M.data_ptr<scalar_t>();
    const int64_t N = M.size(0);
    at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::fill(p + r * N + r + 1, p + (r + 1) * N, scalar_t(0));
    });
  });
  return M.t();
}

// The factor of A + lam I that the sweep's form uses: V (left-looking) or U (right-looking).
at::Tensor factor_matrix(const Ctx& c, const at::Tensor& A, double lam) {
  return c.left ? ul_factor_cpu(A, lam) : upper_chol_of_inverse(A, lam);
}

// Common set-up: work copies, dead columns, initial scales, column order, the sweep's form. Returns
// Hfix (raw H with dead diagonals set to 1; H itself when there are none), permuted.
// `keep_original`: keep the original weights (c.Wo) for a caller that reads them after the sweep.
at::Tensor setup(Ctx& c, const at::Tensor& W, const at::Tensor& H, const at::Tensor* G, int64_t bits,
                 int64_t group_size, const std::optional<at::Tensor>& scales, c10::string_view upd,
                 bool act_order, bool narrow_range, bool keep_original) {
  c.update = parse_update(upd);
  std::tie(c.qmin, c.qmax) = int_grid(bits, narrow_range);
  c.N = W.size(0);
  c.D = W.size(1);
  c.per_channel = group_size == -1;
  c.gs = c.per_channel ? c.D : group_size;
  c.ng = c.D / c.gs;
  c.cd = W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  c.sd = c.cd;

  auto Wc = W.to(c.cd).contiguous();
  auto Hc = H.to(c.cd);
  auto dH = Hc.diagonal();
  auto dead = dH == 0;
  // Scales come from the ORIGINAL weights (dead columns included), as Brevitas initializes them on
  // the first forward before GPTQ zeroes dead columns.
  at::Tensor s0 = scales.has_value() ? scales->to(c.sd).reshape({c.N, c.ng})
                                     : absmax_scales(Wc, c.gs, c.qmin, c.sd);
  // The given scales are used in the working dtype: one that is positive and finite only in a wider
  // dtype (1e-50 or 1e50 given as float64 for float32 work) would become 0 or Inf there.
  TORCH_CHECK(!scales.has_value() || (all_finite(s0) && (s0 > 0).all().item<bool>()),
              "scales: expected values that stay positive and finite in ", c.sd,
              " (the working dtype for W of dtype ", W.scalar_type(), "); a scale underflows to 0 or "
              "overflows to Inf there");
  const bool any_dead = dead.any().item<bool>();
  auto W0 = any_dead ? Wc.masked_fill(dead.unsqueeze(0), 0) : Wc;
  auto dfix = at::where(dead, at::ones_like(dH), dH);

  if (c.update == Update::Layer || c.update == Update::LayerSequential) {
    // ⊙*: PiSO on the EC algorithm's own H (and G), natural order, before the first column.
    std::optional<at::Tensor> Gopt;
    if (G) Gopt = G->to(c.cd);
    s0 = optimal_scales(W0, Hc, Gopt, bits, group_size, c.update == Update::LayerSequential,
                        kPisoEps, narrow_range)
             .to(c.sd)
             .reshape({c.N, c.ng});
  }
  c.sw = s0.to(at::kDouble).contiguous();

  // Column order from diag H: GPTQ with dead columns at 1 (IST), Qronos from the raw diagonal
  // (ALGORITHM §5.2, as Brevitas): a dead column goes last, never first, and the order does not
  // depend on the scale of H.
  c.perm = column_order(G ? dH.contiguous() : dfix, c.gs, act_order, is_group_update(c.update));
  c.col_group = at::div(c.perm, c.gs, "floor").contiguous();
  auto ph = c.perm.cpu();
  c.perm_host.assign(ph.data_ptr<int64_t>(), ph.data_ptr<int64_t>() + c.D);
  bool identity = true;
  for (int64_t i = 0; i < c.D && identity; ++i) identity = c.perm_host[i] == i;
  // H and G are only read from here on: no permuted copy when the order is natural.
  c.Hp = identity ? Hc : permute_sym(Hc, c.perm);
  c.Gp = G ? (identity ? G->to(c.cd) : permute_sym(G->to(c.cd), c.perm)) : c.Hp;
  // The original weights are kept only where something reads them after the sweep started.
  const bool keep_wo = G != nullptr || keep_original || c.update == Update::GroupSequential;
  c.Wp = gather_cols(W0, c.perm);  // always a new tensor: the sweep works in place
  // Qronos's target X w uses the original weights (ALGORITHM §5.2: w = weight_orig): a feature dead
  // in X~ may live in X. Only the weights being quantized have dead columns zeroed.
  if (keep_wo) c.Wo = G ? gather_cols(Wc, c.perm) : c.Wp.clone();
  c.codes = at::empty({c.N, c.D}, W.options().dtype(at::kChar));  // the sweep writes every column
  const char* form = std::getenv("PISO_GPTQ_FORM");  // "right": the GPU's form on CPU too (tests)
  c.left = c.Wp.device().is_cpu() && !is_group_update(c.update) &&
           !(form && std::string(form) == "right");
  if (c.left) c.Res = at::empty_like(c.Wp);
  c.row_loss = at::zeros({c.N}, W.options().dtype(at::kDouble));
  if (!any_dead) return c.Hp;  // dfix == diag H already
  auto Hfix = c.Hp.clone();
  Hfix.diagonal().copy_(dfix.index_select(0, c.perm));
  return Hfix;
}

double mean_diag(const at::Tensor& Hfix) {
  const double m = Hfix.diagonal().to(at::kDouble).mean().item<double>();
  return m > 0 ? m : 1.0;  // a non-PSD H with non-positive mean diagonal: relative to 1
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(Ctx& c, const at::Tensor& W) {
  auto inv = at::argsort(c.perm);
  auto codes = gather_cols(c.codes, inv);
  auto W_hat = gather_cols(c.Wp, inv).to(W.scalar_type());
  check_representable(W_hat, W.scalar_type());
  auto scales = c.sw.to(c.sd);
  if (c.per_channel) scales = scales.reshape({c.N});
  return {codes, scales, W_hat};
}

// (w - w_hat)^T H (w - w_hat) summed over rows, on the undamped H (processing order).
double explicit_loss(const Ctx& c) {
  auto d = (c.Wo - c.Wp).to(at::kDouble);
  return (at::mm(d, c.Hp.to(at::kDouble)) * d).sum().item<double>();
}

void write_stats(const std::optional<at::Tensor>& stats, double lambda, double base, bool fallback,
                 double loss) {
  if (!stats.has_value()) return;
  auto v = at::tensor({lambda, lambda / base, fallback ? 1.0 : 0.0, loss}, at::kDouble);
  stats->copy_(v);
}

// --------------------------------------------------------------------------------------------
// GPTQ
// --------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> gptq_impl(
    const at::Tensor& W, const at::Tensor& H_in, int64_t bits, int64_t group_size,
    const std::optional<at::Tensor>& scales, c10::string_view scales_update, bool act_order,
    int64_t block_size, double damp, bool narrow_range, const std::optional<at::Tensor>& stats) {
  check_common(W, H_in, nullptr, bits, group_size, scales, block_size, stats);
  // Only H's symmetric part enters the objective; the two CPU forms read different triangles.
  const auto H = detail::symmetric_part(H_in);
  TORCH_CHECK(std::isfinite(damp) && damp >= 0, "damp: expected a finite value >= 0, got ", damp);
  Ctx c;
  c.op = "gptq";
  auto Hfix = setup(c, W, H, nullptr, bits, group_size, scales, scales_update, act_order,
                    narrow_range, /*keep_original=*/stats.has_value());
  const double base = mean_diag(Hfix);

  // F = the factor of H + lambda I the sweep's form uses (U or V, see factor_matrix).
  at::Tensor F;
  auto factor = [&](double lam) {
    F = factor_matrix(c, Hfix, lam);
    return F.defined();
  };
  const bool ok = factor_with_escalation("gptq", damp * base, base, factor, c.lambda);
  Hfix = at::Tensor();
  c.fallback = !ok;
  if (!ok) F = at::eye(c.D, c.Wp.options());  // no error diffusion: RTN (U = V = I)
  sweep(c, F, 0, block_size);

  if (stats.has_value()) {
    // Without fallback the OBS identity gives the loss for free: w0 - w_hat = err^T U, and
    // U H_d U^T = I, so (w0 - w_hat)^T H (w0 - w_hat) = sum err^2 - lambda |w0 - w_hat|^2.
    double loss;
    if (ok) {
      loss = c.row_loss.sum().item<double>() -
             c.lambda * (c.Wo - c.Wp).to(at::kDouble).pow(2).sum().item<double>();
    } else {
      loss = explicit_loss(c);
    }
    write_stats(stats, c.lambda, base, !ok, loss);
  }
  return finish(c, W);
}

// --------------------------------------------------------------------------------------------
// Qronos
// --------------------------------------------------------------------------------------------
// lambda_max(H) by 30 power iterations on H / max|H| from a fixed pseudo-random start (seed 42,
// generated on the CPU in float64 so that every device starts from the same vector), as Brevitas.
double lambda_max(const at::Tensor& H) {
  const double scale = H.abs().max().item<double>();
  if (scale == 0) return 0.0;
  auto Hn = H / scale;
  auto gen = at::detail::createCPUGenerator(42);
  auto v = at::randn({H.size(0)}, gen, at::TensorOptions().dtype(at::kDouble)).to(H.options());
  v.div_(v.norm());
  for (int it = 0; it < 30; ++it) {
    auto hv = at::mv(Hn, v);
    const double n = hv.norm().item<double>();
    if (!(n > 0)) return 0.0;
    v = hv.div_(n);
  }
  return at::dot(v, at::mv(Hn, v)).item<double>() * scale;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qronos_impl(
    const at::Tensor& W, const at::Tensor& H_in, const at::Tensor& G, int64_t bits,
    int64_t group_size, const std::optional<at::Tensor>& scales, c10::string_view scales_update,
    bool act_order, int64_t block_size, double alpha, bool narrow_range,
    const std::optional<at::Tensor>& stats) {
  check_common(W, H_in, &G, bits, group_size, scales, block_size, stats);
  // Only H's symmetric part enters the objective; the two CPU forms read different triangles.
  const auto H = detail::symmetric_part(H_in);
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0, "alpha: expected a finite value >= 0, got ",
              alpha);
  Ctx c;
  c.op = "qronos";
  auto Hfix = setup(c, W, H, &G, bits, group_size, scales, scales_update, act_order, narrow_range,
                    /*keep_original=*/true);
  const double base = mean_diag(Hfix);
  const int64_t D = c.D;
  const double lmax = lambda_max(H.to(c.cd));

  // With M = H + lambda I and M' = M[1:,1:]: U' = upper Cholesky factor of S = M'^-1, the inverse
  // used by the ridge re-solve (step 1b, S = U'^T U') and by the sweep of steps 2+ (ALGORITHM
  // §5.2; Brevitas gets S as a Schur complement of M^-1, the same matrix). M itself is positive
  // definite iff M' is and its Schur complement M00 - m^T S m = M00 - |U' m|^2 is positive.
  // Fr is U' (right-looking form) or V' = U'^-1 (left-looking, M' = V' V'^T): products with U'
  // become triangular solves with V'.
  at::Tensor Fr;
  auto factor = [&](double lam) {
    const double m00 = Hfix[0][0].item<double>() + lam;
    if (!(m00 > 0)) return false;
    if (D == 1) return true;
    Fr = factor_matrix(c, Hfix.narrow(0, 1, D - 1).narrow(1, 1, D - 1), lam);
    if (!Fr.defined()) return false;
    auto m = Hfix.select(1, 0).narrow(0, 1, D - 1);
    auto Um = c.left ? at::linalg_solve_triangular(Fr, m.unsqueeze(1), /*upper=*/true).squeeze(1)
                     : at::mv(Fr, m);
    return m00 - Um.to(at::kDouble).pow(2).sum().item<double>() > 0;
  };
  const bool ok = factor_with_escalation("qronos", alpha * std::max(lmax, 0.0), base, factor,
                                         c.lambda);
  c.fallback = !ok;
  const bool groups = is_group_update(c.update);
  if (ok) {
    // Step 1: least-squares value of column 0 given the others (target X w, G = X~^T X).
    const double h00 = Hfix[0][0].item<double>();
    auto v0 = at::mv(c.Wo, c.Gp.select(0, 0));
    if (D > 1) v0.sub_(at::mv(c.Wp.narrow(1, 1, D - 1), c.Hp.select(0, 0).narrow(0, 1, D - 1)));
    c.Wp.select(1, 0).copy_(v0.div_(h00));
    // Group 0's scale is fixed here: after step 1, before step 1b re-solves the other columns
    // (the Qronos timing of ALGORITHM §4.3); its PiSO_S term is evaluated explicitly.
    if (groups) update_group_scale(c, 0, /*explicit_seq=*/true);
    auto Ffull = at::zeros({D, D}, c.Wp.options());
    Ffull[0][0] = 1;
    if (D > 1) Ffull.narrow(0, 1, D - 1).narrow(1, 1, D - 1).copy_(Fr);
    c.Err = at::zeros({c.N, 1}, c.Wp.options());  // right: Err; left: Acc (nothing before column 0)
    run_columns(c, Ffull, 0, 1, 0, 1);
    if (D > 1) {
      // Step 1b: ridge re-solve of the remaining columns toward w given q_0.
      auto rhs = at::mm(c.Wo, c.Gp.narrow(0, 1, D - 1).t());
      rhs.add_(c.Wo.narrow(1, 1, D - 1), c.lambda);
      rhs.sub_(at::outer(c.Wp.select(1, 0), c.Hp.select(1, 0).narrow(0, 1, D - 1)));
      at::Tensor v;  // rhs S, S = M'^-1 = U'^T U' = (V' V'^T)^-1
      if (c.left) {
        v = at::linalg_solve_triangular(Fr.t(), rhs, /*upper=*/false, /*left=*/false);
        v = at::linalg_solve_triangular(Fr, v, /*upper=*/true, /*left=*/false);
      } else {
        v = at::mm(at::mm(rhs, Fr.t()), Fr);
      }
      c.Wp.narrow(1, 1, D - 1).copy_(v);
      Hfix = at::Tensor();
      // Steps 2+: GPTQ sweep on the remaining columns with U' / V' (index shifted by one).
      sweep(c, Ffull, 1, block_size);
    }
  } else {
    Hfix = at::Tensor();
    sweep(c, at::eye(D, c.Wp.options()), 0, block_size);
  }
  if (stats.has_value()) write_stats(stats, c.lambda, base, !ok, explicit_loss(c));
  return finish(c, W);
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CPU, m) {
  m.impl("gptq", &gptq_impl);
  m.impl("qronos", &qronos_impl);
}

#ifdef PISO_WITH_CUDA
TORCH_LIBRARY_IMPL(piso, CUDA, m) {
  m.impl("gptq", &gptq_impl);
  m.impl("qronos", &qronos_impl);
}
#endif

}  // namespace piso
