// pack / unpack / dequant_matmul through the C++ API against at:: references.
#include <gtest/gtest.h>

#include "torch_piso.h"

namespace {

at::Tensor random_codes(int64_t N, int64_t D, int64_t bits) {
  const int64_t lo = -(int64_t(1) << (bits - 1)), hi = (int64_t(1) << (bits - 1)) - 1;
  auto c = at::randint(lo, hi + 1, {N, D}, at::kChar);
  c.select(1, 0).fill_(lo);  // both grid ends in every row
  c.select(1, D - 1).fill_(hi);
  return c;
}

// Dense float64 weight scale * code with contiguous groups along the input dimension.
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size) {
  const int64_t D = codes.size(1);
  auto s = scales.to(at::kDouble);
  s = group_size == -1 ? s.unsqueeze(1).expand({codes.size(0), D})
                       : s.repeat_interleave(group_size, 1);
  return codes.to(at::kDouble) * s;
}

}  // namespace

TEST(Pack, RoundTripsEveryBitWidthAndWidth) {
  at::manual_seed(0);
  for (int64_t bits = 2; bits <= 8; ++bits) {
    for (int64_t D : {1, 31, 32, 33, 100, 257}) {
      auto codes = random_codes(9, D, bits);
      auto packed = piso::pack(codes, bits);
      EXPECT_EQ(packed.scalar_type(), at::kInt);
      EXPECT_EQ(packed.size(1), (D * bits + 31) / 32) << "bits=" << bits << " D=" << D;
      EXPECT_TRUE(at::equal(piso::unpack(packed, bits, D), codes)) << "bits=" << bits << " D=" << D;
    }
  }
}

TEST(Pack, FourBitLayoutIsLowNibbleFirst) {
  // codes 0..7 then -8..-1 -> offsets u = code + 8 = 8..15, 0..7; word 0 holds u of codes 0..7.
  auto codes = at::arange(-8, 8, at::kChar).roll(-8).unsqueeze(0);  // 0..7, -8..-1
  auto packed = piso::pack(codes, 4);
  const uint32_t w0 = static_cast<uint32_t>(packed[0][0].item<int32_t>());
  const uint32_t w1 = static_cast<uint32_t>(packed[0][1].item<int32_t>());
  EXPECT_EQ(w0, 0xFEDCBA98u);
  EXPECT_EQ(w1, 0x76543210u);
}

TEST(Pack, RejectsOutOfRangeCodesAndBadBits) {
  auto codes = at::zeros({2, 8}, at::kChar);
  codes[0][3] = 2;  // > 1, the 2-bit maximum
  EXPECT_THROW(piso::pack(codes, 2), c10::Error);
  EXPECT_THROW(piso::pack(at::zeros({2, 8}, at::kChar), 1), c10::Error);
  EXPECT_THROW(piso::pack(at::zeros({2, 8}, at::kInt), 4), c10::Error);
  auto packed = piso::pack(at::zeros({2, 8}, at::kChar), 4);
  EXPECT_THROW(piso::unpack(packed, 4, 9), c10::Error);
}

TEST(DequantMatmul, MatchesFloat64DenseReference) {
  at::manual_seed(0);
  const int64_t N = 70, D = 96;
  for (int64_t bits : {2, 3, 4, 8}) {
    for (int64_t gs : {int64_t(-1), int64_t(32)}) {
      for (int64_t M : {1, 5, 40}) {
        for (auto dt : {at::kFloat, at::kDouble, at::kBFloat16}) {
          auto codes = random_codes(N, D, bits);
          auto scales = gs == -1 ? at::rand({N}) * 0.1 + 0.01 : at::rand({N, D / gs}) * 0.1 + 0.01;
          auto bias = at::randn({N});
          auto x = at::randn({M, D}).to(dt);
          auto y = piso::dequant_matmul(x, piso::pack(codes, bits), scales, bits, gs, D, bias);
          ASSERT_EQ(y.scalar_type(), dt);
          ASSERT_EQ(y.sizes(), at::IntArrayRef({M, N}));
          auto ref = at::addmm(bias.to(at::kDouble), x.to(at::kDouble),
                               dequantize(codes, scales, gs).t());
          const double tol = dt == at::kBFloat16 ? 2e-2 : (dt == at::kFloat ? 1e-4 : 1e-12);
          EXPECT_TRUE(at::allclose(y.to(at::kDouble), ref, tol, tol))
              << "bits=" << bits << " gs=" << gs << " M=" << M << " dtype=" << dt;
        }
      }
    }
  }
}

TEST(DequantMatmul, KeepsLeadingDimsAndRejectsBadShapes) {
  at::manual_seed(7);
  auto codes = random_codes(12, 64, 4);
  auto packed = piso::pack(codes, 4);
  auto scales = at::rand({12, 4}) + 0.1;
  auto y = piso::dequant_matmul(at::randn({2, 3, 64}), packed, scales, 4, 16, 64);
  EXPECT_EQ(y.sizes(), at::IntArrayRef({2, 3, 12}));
  EXPECT_THROW(piso::dequant_matmul(at::randn({3, 63}), packed, scales, 4, 16, 64), c10::Error);
  EXPECT_THROW(piso::dequant_matmul(at::randn({3, 64}), packed, scales, 4, 24, 64), c10::Error);
  EXPECT_THROW(piso::dequant_matmul(at::randn({3, 64}), packed, at::rand({12}), 4, 16, 64),
               c10::Error);
  EXPECT_THROW(piso::dequant_matmul(at::randn({3, 64}), packed, scales, 3, 16, 64), c10::Error);
}
