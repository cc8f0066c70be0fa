#include <bitnet/hf_safetensors.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
namespace fs = std::filesystem;
using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;

namespace {

struct scratch_dir {
  fs::path path;
  scratch_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("bitnet_hf_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::vector<std::byte> image(const std::string& header, std::initializer_list<int> data) {
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = std::byte((header.size() >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(std::byte(c));
  for (int v : data) out.push_back(std::byte(v));
  return out;
}

}  // namespace

TEST_CASE("hf files: a packed layer as transformers stores it (out = 5, BF16 scale)") {
  // q (5 x 2) = [[1,-1],[0,0],[-1,1],[1,1],[0,-1]], codes q+1 = [[2,0],[1,1],[0,2],[2,2],[1,0]];
  // R = 2: packed row 0 = rows 0,2,4 in bits 0,2,4; packed row 1 = rows 1,3 in bits 0,2.
  //   (0,0) = 2 | 0<<2 | 1<<4 = 18   (0,1) = 0 | 2<<2 | 0<<4 = 8
  //   (1,0) = 1 | 2<<2 = 9           (1,1) = 1 | 2<<2 = 9
  // weight_scale BF16 0x3d40 = 0.046875 (autobitlinear: mean|W|, as the file's __metadata__ declares).
  const std::string header =
      R"({"model.layers.0.mlp.down_proj.weight":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]},)"
      R"("model.layers.0.mlp.down_proj.weight_scale":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]},)"
      R"("__metadata__":{"quantization_config":"{\"quant_method\": \"bitnet\", \"linear_class\": \"autobitlinear\"}"}})";
  const auto file = st::reader::from_bytes(image(header, {18, 8, 9, 9, 0x40, 0x3d}));
  const hf::packed_layer<float> packed = hf::read_packed_layer<float>(file, "model.layers.0.mlp.down_proj", 5);
  CHECK(packed.weight_scale == 0.046875f);
  Matrix<std::int8_t> q(5, 2);
  q << 1, -1, 0, 0, -1, 1, 1, 1, 0, -1;
  CHECK(hf::unpack_weights(packed.weight, 5) == q);
  const BitLinear<float> layer = hf::load_bit_linear<float>(file, "model.layers.0.mlp.down_proj", 5);
  CHECK(layer.ternary_weight() == q);
  CHECK(layer.weight_scale() == 1.0f / 0.046875f);
  // Without out_features and without bias, 4 x packed rows = 8 is assumed: rows 5..7 are padding
  // holding code 0, i.e. value -1 for transformers; here they are simply read as -1 rows.
  CHECK(hf::read_packed_layer<float>(file, "model.layers.0.mlp.down_proj").out_features == 8);
  CHECK_THROWS_AS(hf::read_packed_layer<float>(file, "model.layers.0.mlp.down_proj", 9), bitnet::shape_error);
  CHECK_THROWS_AS(hf::read_packed_layer<float>(file, "model.layers.0.mlp.up_proj", 5), bitnet::io_error);
}

TEST_CASE("hf files: mis-typed tensors are reported") {
  const std::string header =
      R"({"l.weight":{"dtype":"I8","shape":[1,2],"data_offsets":[0,2]},)"
      R"("l.weight_scale":{"dtype":"F32","shape":[2],"data_offsets":[2,10]},)"
      R"("m.weight":{"dtype":"U8","shape":[1,2],"data_offsets":[10,12]},)"
      R"("m.weight_scale":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})";
  const auto file = st::reader::from_bytes(image(header, {0, 0, 0, 0, 128, 63, 0, 0, 128, 63, 0, 0, 0, 0, 128, 63, 0, 0, 128, 63}));
  const auto bitlinear = hf::scale_convention::bitlinear;
  CHECK_THROWS_WITH_AS(hf::read_packed_layer<float>(file, "l", 0, bitlinear), doctest::Contains("must be U8"), bitnet::io_error);
  CHECK_THROWS_WITH_AS(hf::read_packed_layer<float>(file, "m", 0, bitlinear), doctest::Contains("expected 1"), bitnet::shape_error);
}

TEST_CASE_TEMPLATE("hf files: write and reload BitLinear layers in both conventions", T, float, double) {
  scratch_dir dir;
  std::mt19937 rng(4);
  std::normal_distribution<double> dist(0.0, 0.02);
  Matrix<T> w(10, 12);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = T(dist(rng));
  Vector<T> bias = Vector<T>::LinSpaced(10, T(-0.5), T(0.5));
  const BitLinear<T> original(w, bias);
  Matrix<T> x(3, 12);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(dist(rng) * 50);

  for (auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear}) {
    CAPTURE(hf::convention_name(convention));
    const fs::path path = dir.path / "layer.safetensors";
    {
      std::vector<st::tensor_spec> specs;
      hf::declare_packed_layer(specs, "blocks.0.fc", 10, 12, true, st::dtype_of<T>(), st::dtype_of<T>());
      st::writer out(path, std::move(specs), {{"format", "pt"}});
      hf::write_packed_layer(out, "blocks.0.fc", hf::to_packed(original, convention));
      out.finish();
    }
    const st::reader in(path);
    CHECK(in.info("blocks.0.fc.weight").shape == std::vector<std::uint64_t>{3, 12});
    const BitLinear<T> loaded = hf::load_bit_linear<T>(in, "blocks.0.fc", 0, convention);
    CHECK(loaded.out_features() == 10);
    CHECK(loaded.ternary_weight() == original.ternary_weight());
    CHECK(loaded.weight_scale() == original.weight_scale());
    CHECK_FALSE(loaded.has_latent_weights());
    CHECK_THROWS_AS((void)loaded.weight(), bitnet::state_error);
    if (convention == hf::scale_convention::bitlinear) {
      CHECK(*loaded.bias() == bias);
      CHECK(loaded.forward(x) == original.forward(x));
    } else {
      // autobitlinear stores b * s and multiplies back by m = 1/s: exact up to two roundings.
      for (Index i = 0; i < 10; ++i) CHECK((*loaded.bias())(i) == doctest::Approx(bias(i)).epsilon(1e-6));
    }
  }
}

TEST_CASE_TEMPLATE("hf files: 300 random scales come back bit for bit in both conventions", T, float, double) {
  // One file of 300 small layers, each with its own scale stored in T's dtype; loaded with
  // load_bit_linear, every weight_scale() is the stored s (bitlinear) or T(1) / m (autobitlinear).
  scratch_dir dir;
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> exponent(-4, 4);
  const int layers = 300;
  std::vector<T> scales;
  for (int i = 0; i < layers; ++i) scales.push_back(T(std::pow(10.0, exponent(rng))));
  Matrix<std::int8_t> q(3, 5);
  q << 1, 0, -1, 1, 1,  //
      0, 0, 0, -1, 1,   //
      -1, 1, 0, 0, 1;
  const fs::path path = dir.path / "scales.safetensors";
  {
    std::vector<st::tensor_spec> specs;
    for (int i = 0; i < layers; ++i)
      hf::declare_packed_layer(specs, "l" + std::to_string(i), 3, 5, false, st::dtype_of<T>());
    st::writer out(path, std::move(specs));
    for (int i = 0; i < layers; ++i)
      hf::write_packed_layer(out, "l" + std::to_string(i),
                             hf::packed_layer<T>{hf::pack_weights(q), 3, scales[std::size_t(i)], std::nullopt});
    out.finish();
  }
  const st::reader in(path);
  int exact_bitlinear = 0, exact_autobitlinear = 0;
  for (int i = 0; i < layers; ++i) {
    const std::string name = "l" + std::to_string(i);
    const T stored = scales[std::size_t(i)];
    const BitLinear<T> plain = hf::load_bit_linear<T>(in, name, 3, hf::scale_convention::bitlinear);
    const BitLinear<T> automatic = hf::load_bit_linear<T>(in, name, 3, hf::scale_convention::autobitlinear);
    // Positive finite values: equal means bit-identical.
    exact_bitlinear += plain.ternary_weight() == q && plain.weight_scale() == stored;
    exact_autobitlinear += automatic.ternary_weight() == q && automatic.weight_scale() == T(1) / stored;
  }
  MESSAGE("scales read back exactly: bitlinear " << exact_bitlinear << ", autobitlinear " << exact_autobitlinear << " of "
                                                  << layers);
  CHECK(exact_bitlinear == layers);
  CHECK(exact_autobitlinear == layers);
}
