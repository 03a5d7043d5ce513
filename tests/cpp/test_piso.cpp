// C++ API of PiSO (optimal_scales, piso_sweep, quantize_rtn) against an at:: float64 brute force.
#include <gtest/gtest.h>

#include "torch_piso.h"

#include <cmath>

namespace {

// E(s) = s^2 q^T H q - 2 s q^T lin per row for scales s [R] (q = clamp(round(w / s)) in float64).
at::Tensor objective(const at::Tensor& W, const at::Tensor& lin, const at::Tensor& H,
                     const at::Tensor& s, int64_t qmin, int64_t qmax) {
  auto q = at::clamp(at::round(W.to(at::kDouble) / s.to(at::kDouble).unsqueeze(1)), qmin, qmax);
  auto beta = (at::matmul(q, H) * q).sum(1);
  auto alpha = (q * lin).sum(1);
  auto sd = s.to(at::kDouble);
  return sd * sd * beta - 2.0 * sd * alpha;
}

// Minimum of E per row over a dense scan of s plus both sides of every breakpoint |w_i| / (k + 1/2).
at::Tensor brute_force(const at::Tensor& W, const at::Tensor& lin, const at::Tensor& H, int64_t qmin,
                       int64_t qmax) {
  const int64_t R = W.size(0);
  auto out = at::empty({R}, at::kDouble);
  for (int64_t r = 0; r < R; ++r) {
    auto w = W[r].to(at::kDouble);
    const double amax = w.abs().max().item<double>();
    auto scan = at::arange(1, 3001, at::kDouble) * (4.0 * amax / std::max(-qmin, qmax) / 3000.0);
    auto k = at::arange(std::max(-qmin, qmax), at::kDouble) + 0.5;
    auto bp = (w.abs().unsqueeze(1) / k.unsqueeze(0)).reshape({-1});
    bp = bp.index({bp > 0});
    auto s = at::cat({scan, bp * (1 + 1e-7), bp * (1 - 1e-7)});
    const int64_t M = s.size(0);
    auto e = objective(w.unsqueeze(0).expand({M, -1}), lin[r].unsqueeze(0).expand({M, -1}), H, s, qmin,
                       qmax);
    out[r] = e.min();
  }
  return out;
}

at::Tensor spd(int64_t D) {
  auto A = at::randn({D, D + 2}, at::kDouble);
  return at::matmul(A, A.t()) / D + 0.05 * at::eye(D, at::kDouble);
}

}  // namespace

TEST(PisoSweep, SequentialAndEventParallelMatchBruteForce) {
  at::manual_seed(0);
  for (int64_t bits : {2, 3, 4}) {
    const int64_t qmin = -(int64_t(1) << (bits - 1)), qmax = (int64_t(1) << (bits - 1)) - 1;
    for (int64_t D : {1, 6, 20}) {
      auto W = at::randn({4, D}, at::kDouble);
      auto H = spd(D);
      auto lin = at::matmul(W, H);
      auto eb = brute_force(W, lin, H, qmin, qmax);
      for (const char* algo : {"sequential", "event_parallel"}) {
        auto res = piso::piso_sweep(W, lin, H, qmin, qmax, 1e-9, algo);
        auto s = std::get<0>(res), obj = std::get<1>(res);
        EXPECT_TRUE((s > 0).all().item<bool>());
        EXPECT_TRUE(at::allclose(obj, objective(W, lin, H, s, qmin, qmax), 1e-9, 1e-9)) << algo;
        EXPECT_TRUE((obj <= eb + 1e-5 + 1e-6 * eb.abs()).all().item<bool>())
            << algo << " bits=" << bits << " D=" << D;
      }
    }
  }
}

TEST(PisoOptimalScales, Float32ScaleReproducesItsObjectiveAndBeatsBruteForce) {
  at::manual_seed(1);
  const int64_t D = 12;
  auto W = at::randn({6, D}, at::kFloat);
  auto H = spd(D).to(at::kFloat);
  auto s = piso::optimal_scales(W, H, std::nullopt, 3);
  ASSERT_EQ(s.scalar_type(), at::kFloat);
  auto Hd = H.to(at::kDouble);
  auto lin = at::matmul(W.to(at::kDouble), Hd);
  auto e = objective(W, lin, Hd, s, -4, 3);
  auto eb = brute_force(W, lin, Hd, -4, 3);
  EXPECT_TRUE((e <= eb + 1e-5 + 1e-6 * eb.abs()).all().item<bool>());
  auto rtn = piso::quantize_rtn(W, s, 3);
  auto codes = std::get<0>(rtn);
  EXPECT_EQ(codes.scalar_type(), at::kChar);
  EXPECT_TRUE(at::equal(codes.to(at::kDouble),
                        at::clamp(at::round(W.to(at::kDouble) / s.to(at::kDouble).unsqueeze(1)), -4, 3)));
}

TEST(PisoOptimalScales, KnownScaleRecoveryAndZeroRow) {
  at::manual_seed(7);
  auto Q = at::randint(-8, 8, {3, 10}, at::kLong).to(at::kDouble);
  // -8 and 7 in every row make s = 0.3 the only zero-error scale: another one, 0.3 c, needs c to
  // divide both codes (c = 1 / m puts -8 m off the grid). -8 alone does not: with all codes even,
  // 0.6 is exact too, and ties go to the larger scale.
  Q.select(1, 0).fill_(-8);
  Q.select(1, 1).fill_(7);
  auto W = 0.3 * Q;
  W[2].zero_();
  auto s = piso::optimal_scales(W, std::nullopt, std::nullopt, 4);
  EXPECT_NEAR(s[0].item<double>(), 0.3, 1e-6);
  EXPECT_NEAR(s[1].item<double>(), 0.3, 1e-6);
  EXPECT_EQ(s[2].item<double>(), 1.0);
}

TEST(PisoOptimalScales, RejectsBadInput) {
  at::manual_seed(7);
  auto W = at::randn({4, 8});
  EXPECT_THROW(piso::optimal_scales(W, at::eye(7), std::nullopt, 4), c10::Error);
  EXPECT_THROW(piso::optimal_scales(W, std::nullopt, std::nullopt, 9), c10::Error);
  EXPECT_THROW(piso::optimal_scales(W, std::nullopt, std::nullopt, 4, 3), c10::Error);
  EXPECT_THROW(piso::quantize_rtn(W, at::zeros({4}), 4), c10::Error);
}
