// The replace_report: per-layer numbers, totals, the table.
#include <bitnet/replace_report.hpp>

#include <bitnet/replace.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>

#include <doctest/doctest.h>

#include "graph_fixtures.hpp"
#include "reference.hpp"

using namespace fixtures;

TEST_CASE("replace_report: per-layer numbers computed independently, totals, aligned table") {
  std::mt19937 rng(16);
  std::map<std::string, slot> g;
  g.emplace("enc.proj", random_linear<float>(10, 3, rng));
  g.emplace("head", random_linear<float>(4, 5, rng, false));
  const Matrix<float> w = std::get<0>(g.at("enc.proj")).weight;
  const auto report = bitnet::replace_linear(g);
  REQUIRE(report.layers.size() == 2);
  const auto& row = report.layers[0];
  CHECK(row.path == "enc.proj");
  CHECK(row.in_features == 10);
  CHECK(row.out_features == 3);
  CHECK(row.has_bias);
  CHECK_FALSE(report.layers[1].has_bias);
  const float s = reference::weight_scale(w);
  CHECK(row.weight_scale == double(s));
  const Matrix<std::int8_t> codes = reference::weight_codes(w, s);
  double zeros = 0, err = 0, norm = 0;
  for (Index i = 0; i < w.size(); ++i) {
    zeros += codes.data()[i] == 0;
    const double d = double(w.data()[i]) - double(codes.data()[i]) / double(s);
    err += d * d;
    norm += double(w.data()[i]) * double(w.data()[i]);
  }
  CHECK(row.zero_fraction == doctest::Approx(zeros / 30));
  CHECK(row.reconstruction_error == doctest::Approx(std::sqrt(err / norm)));
  CHECK(row.latent_bytes == 30 * sizeof(float));
  // the packed format pads rows to blocks of 16 and columns to a multiple of 64, 2 bits per code
  CHECK(row.packed_bytes == 16 * 64 / 4);
  CHECK(report.layers[1].packed_bytes == 16 * 64 / 4);
  CHECK(report.total_latent_bytes() == (30 + 20) * sizeof(float));
  CHECK(report.total_packed_bytes() == 256 + 256);
  CHECK(report.total_weights() == 50);

  std::ostringstream out;
  out << report;
  CHECK(out.str() == report.to_string());
  std::istringstream lines(out.str());
  std::string header, first, second, rule, total;
  std::getline(lines, header);
  std::getline(lines, first);
  std::getline(lines, second);
  std::getline(lines, rule);
  std::getline(lines, total);
  CHECK(header.rfind("layer", 0) == 0);
  CHECK(first.rfind("enc.proj", 0) == 0);
  CHECK(second.rfind("head", 0) == 0);
  CHECK(total.rfind("total (2 layers)", 0) == 0);
  // right-aligned columns: every line of the table has the same width
  CHECK(first.size() == header.size());
  CHECK(second.size() == header.size());
  CHECK(rule.size() == header.size());
  CHECK(total.size() == header.size());
  CHECK(first.find("10x3") != std::string::npos);
  CHECK(total.find("200 B") != std::string::npos);
}
