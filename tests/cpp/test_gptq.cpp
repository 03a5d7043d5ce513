// C++ API of gptq / qronos against a tiny at:: float64 GPTQ (column at a time, no lazy batching).
#include <gtest/gtest.h>

#include "torch_piso.h"

#include <cmath>

namespace {

at::TensorOptions f64() { return at::TensorOptions().dtype(at::kDouble); }

// Correlated features: H = X^T X with X = Z (I + A) scaled per column.
std::tuple<at::Tensor, at::Tensor> problem(int64_t N, int64_t D) {
  at::manual_seed(0);
  auto A = at::randn({D, D}, f64()) / std::sqrt(double(D));
  auto X = at::mm(at::randn({4 * D, D}, f64()), at::eye(D, f64()) + A) *
           at::linspace(0.3, 2.0, D, f64());
  return {at::randn({N, D}, f64()), at::mm(X.t(), X)};
}

// Textbook GPTQ: static natural-order groups, absmax scales of W, damping damp * mean diag H.
at::Tensor reference_codes(const at::Tensor& W_in, const at::Tensor& H_in, int64_t bits,
                           int64_t gs, bool act_order, double damp) {
  const int64_t N = W_in.size(0), D = W_in.size(1);
  const double qmin = -std::pow(2.0, bits - 1), qmax = std::pow(2.0, bits - 1) - 1;
  auto s = W_in.abs().reshape({N, D / gs, gs}).amax(2) / -qmin;  // [N, D/gs]
  auto perm = act_order ? std::get<1>(at::sort(H_in.diagonal(), /*stable=*/true, 0, true))
                        : at::arange(D, at::kLong);
  auto W = W_in.index_select(1, perm).clone();
  auto H = H_in.index_select(0, perm).index_select(1, perm).clone();
  H.diagonal().add_(damp * H.diagonal().mean().item<double>());
  auto U = at::linalg_cholesky(at::cholesky_inverse(at::linalg_cholesky(H)), /*upper=*/true);
  auto Q = at::zeros({N, D}, at::kLong);
  for (int64_t i = 0; i < D; ++i) {
    auto si = s.select(1, perm[i].item<int64_t>() / gs);
    auto q = at::clamp(at::round(W.select(1, i) / si), qmin, qmax);
    Q.select(1, i).copy_(q);
    auto err = (W.select(1, i) - si * q) / U[i][i];
    W.narrow(1, i, D - i).sub_(at::outer(err, U[i].narrow(0, i, D - i)));
  }
  return Q.index_select(1, at::argsort(perm));
}

}  // namespace

TEST(Gptq, MatchesTinyReferencePerChannelAndGrouped) {
  auto [W, H] = problem(24, 64);
  for (int64_t gs : {-1, 16}) {
    for (bool act_order : {false, true}) {
      auto [codes, scales, W_hat] = piso::gptq(W, H, 3, gs, std::nullopt, "none", act_order, 16);
      auto ref = reference_codes(W, H, 3, gs == -1 ? 64 : gs, act_order, 0.01);
      const double mismatch = (codes.to(at::kLong) != ref).to(at::kDouble).mean().item<double>();
      EXPECT_LE(mismatch, 1e-3) << "gs=" << gs << " act_order=" << act_order;
      // W_hat is exactly scale * code.
      auto s = gs == -1 ? scales.unsqueeze(1) : scales.repeat_interleave(gs, 1);
      EXPECT_TRUE(at::equal(W_hat, s * codes.to(at::kDouble)));
    }
  }
}

TEST(Gptq, StatsReportDampingAndTheLayerLoss) {
  auto [W, H] = problem(16, 32);
  auto stats = at::zeros({4}, f64());
  auto [codes, scales, W_hat] = piso::gptq(W, H, 4, -1, std::nullopt, "none", true, 128, 0.01,
                                           false, stats);
  auto d = W - W_hat;
  const double loss = (at::mm(d, H) * d).sum().item<double>();
  EXPECT_NEAR(stats[1].item<double>(), 0.01, 1e-12);
  EXPECT_EQ(stats[2].item<double>(), 0.0);
  EXPECT_NEAR(stats[3].item<double>(), loss, 1e-8 * loss);
}

TEST(Gptq, NeverFactoringHFallsBackToRtn) {
  auto [W, H] = problem(8, 16);
  H[2][2] = -1e9;
  auto stats = at::zeros({4}, f64());
  auto [codes, scales, W_hat] = piso::gptq(W, H, 4, -1, std::nullopt, "none", true, 128, 0.01,
                                           false, stats);
  EXPECT_EQ(stats[2].item<double>(), 1.0);
  auto rtn = at::clamp(at::round(W / scales.unsqueeze(1)), -8, 7);
  EXPECT_TRUE(at::equal(codes.to(at::kDouble), rtn));
  EXPECT_TRUE(at::isfinite(W_hat).all().item<bool>());
}

TEST(Qronos, WithCrossTermEqualToHIsGptqWithTheSameDamping) {
  auto [W, H] = problem(24, 48);
  auto st = at::zeros({4}, f64());
  auto q = piso::qronos(W, H, H, 3, -1, std::nullopt, "none", true, 16, 1e-4, false, st);
  auto g = piso::gptq(W, H, 3, -1, std::nullopt, "none", true, 16, st[1].item<double>());
  const double mismatch =
      (std::get<0>(q) != std::get<0>(g)).to(at::kDouble).mean().item<double>();
  EXPECT_LE(mismatch, 1e-3);
}

TEST(GptqQronos, RejectBadInput) {
  auto [W, H] = problem(4, 16);
  EXPECT_THROW(piso::gptq(W, H.narrow(0, 0, 8), 4), c10::Error);
  EXPECT_THROW(piso::gptq(W, H, 9), c10::Error);
  EXPECT_THROW(piso::gptq(W, H, 4, 5), c10::Error);
  EXPECT_THROW(piso::gptq(W, H, 4, -1, std::nullopt, "bogus"), c10::Error);
  EXPECT_THROW(piso::gptq(W, H, 4, -1, at::ones({3}, f64())), c10::Error);
  auto Wn = W.clone();
  Wn[0][0] = std::nan("");
  EXPECT_THROW(piso::gptq(Wn, H, 4), c10::Error);
  EXPECT_THROW(piso::qronos(W, H, H.narrow(1, 0, 8), 4), c10::Error);
}
