// C++ API of the Hessian ops against an at:: float64 reference.
#include <gtest/gtest.h>

#include "torch_piso.h"

#include <cmath>

TEST(HessianAccumulate, MatchesFloat64ReferenceAndIsSymmetric) {
  at::manual_seed(0);
  for (int64_t D : {7, 300, 700}) {
    for (auto dt : {at::kFloat, at::kBFloat16, at::kDouble}) {
      auto x = at::randn({3, 41, D}, at::TensorOptions().dtype(dt));
      auto H = at::zeros({D, D}, at::kDouble);
      piso::hessian_accumulate_(H, x);
      auto x2 = x.reshape({-1, D}).to(at::kDouble);
      auto ref = at::mm(x2.t(), x2);
      EXPECT_TRUE(at::allclose(H, ref, 1e-10, 1e-9)) << "D=" << D << " dtype=" << dt;
      EXPECT_TRUE(at::equal(H, H.t()));
    }
  }
}

TEST(HessianAccumulate, AccumulatesAcrossCalls) {
  at::manual_seed(7);
  auto x1 = at::randn({64, 33}, at::kFloat);
  auto x2 = at::randn({17, 33}, at::kFloat);
  auto H = at::zeros({33, 33}, at::kFloat);
  piso::hessian_accumulate_(H, x1);
  piso::hessian_accumulate_(H, x2);
  auto x = at::cat({x1, x2}).to(at::kDouble);
  EXPECT_TRUE(at::allclose(H.to(at::kDouble), at::mm(x.t(), x), 1e-4, 1e-4));
}

TEST(HessianAccumulate, RejectsBadInput) {
  at::manual_seed(7);
  auto H = at::zeros({8, 8}, at::kFloat);
  auto bad_d = at::randn({4, 9});
  EXPECT_THROW(piso::hessian_accumulate_(H, bad_d), c10::Error);
  auto Hint = at::zeros({8, 8}, at::kInt);
  auto x = at::randn({4, 8});
  EXPECT_THROW(piso::hessian_accumulate_(Hint, x), c10::Error);
  auto xnan = at::randn({4, 8});
  xnan[0][0] = std::nan("");
  EXPECT_THROW(piso::hessian_accumulate_(H, xnan), c10::Error);
}

TEST(CrossAccumulate, MatchesFloat64Reference) {
  at::manual_seed(7);
  auto xq = at::randn({5, 20, 31}, at::kFloat);
  auto xf = at::randn({5, 20, 31}, at::kFloat);
  auto G = at::zeros({31, 31}, at::kDouble);
  piso::cross_accumulate_(G, xq, xf);
  auto a = xq.reshape({-1, 31}).to(at::kDouble), b = xf.reshape({-1, 31}).to(at::kDouble);
  EXPECT_TRUE(at::allclose(G, at::mm(a.t(), b), 1e-10, 1e-9));
  auto xf_short = at::randn({3, 31});
  EXPECT_THROW(piso::cross_accumulate_(G, xq, xf_short), c10::Error);
}

TEST(HessianAccumulate, NonContiguousXGivesTheContiguousResult) {
  at::manual_seed(7);
  auto base = at::randn({40, 2 * 37}, at::kFloat);
  auto x = base.slice(1, 0, 2 * 37, 2);  // every other column: non-contiguous
  ASSERT_FALSE(x.is_contiguous());
  auto H = at::zeros({37, 37}, at::kFloat);
  auto Hc = at::zeros({37, 37}, at::kFloat);
  piso::hessian_accumulate_(H, x);
  piso::hessian_accumulate_(Hc, x.contiguous());
  EXPECT_TRUE(at::equal(H, Hc));
}

TEST(HessianAccumulate, EmptyBatchIsANoOp) {
  at::manual_seed(7);
  auto H = at::randn({6, 6}, at::kDouble);
  auto H0 = H.clone();
  piso::hessian_accumulate_(H, at::empty({0, 6}, at::kFloat));
  EXPECT_TRUE(at::equal(H, H0));
}

TEST(HessianAccumulate, RejectsNonContiguousHAndIntegerX) {
  at::manual_seed(7);
  auto H = at::zeros({8, 8}, at::kFloat).t();
  auto x = at::randn({4, 8});
  EXPECT_THROW(piso::hessian_accumulate_(H, x), c10::Error);
  auto H2 = at::zeros({8, 8}, at::kFloat);
  EXPECT_THROW(piso::hessian_accumulate_(H2, at::ones({4, 8}, at::kInt)), c10::Error);
  auto xinf = at::randn({4, 8}).to(at::kBFloat16);
  xinf[3][7] = INFINITY;
  EXPECT_THROW(piso::hessian_accumulate_(H2, xinf), c10::Error);
  EXPECT_TRUE(at::equal(H2, at::zeros({8, 8}, at::kFloat)));  // untouched by the rejected call
}
