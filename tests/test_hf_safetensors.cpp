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

// ---- group-scaled (and per-row) layers in bitnet's packed form --------------------------------

namespace {

// The __metadata__ entry of a quantization_config text (escaped for the JSON header).
std::string metadata_of(const std::string& config) {
  std::string escaped;
  for (char c : config) {
    if (c == '"') escaped += '\\';
    escaped += c;
  }
  return R"("__metadata__":{"quantization_config":")" + escaped + "\"}";
}

// A 2 x 64 layer, per_group 32, written by hand: codes row 0 (c % 3) - 1, row 1 ((c + 1) % 3) - 1;
// transformers' layout with R = 1 puts row 0 in bits 0-1 and row 1 in bits 2-3 of byte c. Scales
// F32 [2, 2] = [[0.5, 0.25], [2, 1]].
std::vector<std::byte> group_layer_image(const std::string& config, const std::string& scale_shape = "[2,2]",
                                         int scale_bytes = 16) {
  std::vector<int> data;
  for (int c = 0; c < 64; ++c) data.push_back((c % 3) | (((c + 1) % 3) << 2));
  const float scales[4] = {0.5f, 0.25f, 2.0f, 1.0f};
  for (int i = 0; i < scale_bytes; ++i) data.push_back(int(reinterpret_cast<const unsigned char*>(scales)[i]));
  const std::string header = R"({"fc.weight":{"dtype":"U8","shape":[1,64],"data_offsets":[0,64]},)"
                             R"("fc.weight_scale":{"dtype":"F32","shape":)" +
                             scale_shape + R"(,"data_offsets":[64,)" + std::to_string(64 + scale_bytes) + "]}," +
                             metadata_of(config) + "}";
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = std::byte((header.size() >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(std::byte(c));
  for (int v : data) out.push_back(std::byte(v));
  return out;
}

const std::string group32 =
    R"({"quant_method": "bitnet", "linear_class": "autobitlinear", "bitnet_weight_scales": "per_group", "bitnet_group_size": 32})";

}  // namespace

TEST_CASE("hf files: a per_group layer written by hand reads as its codes times [out, groups] scales") {
  const auto file = st::reader::from_bytes(group_layer_image(group32));
  const BitLinear<float> layer = hf::load_bit_linear<float>(file, "fc");
  REQUIRE(layer.out_features() == 2);  // from the scales' rows, not 4 x packed rows
  CHECK(layer.options().weight_scales == bitnet::weight_scaling::per_group);
  CHECK(layer.options().group_size == 32);
  CHECK(layer.options().activation_scales == bitnet::activation_scaling::per_token);
  CHECK_FALSE(layer.options().rotation);
  Matrix<float> expected(2, 64);
  for (int c = 0; c < 64; ++c) {
    expected(0, c) = float(c % 3 - 1) * (c < 32 ? 0.5f : 0.25f);
    expected(1, c) = float((c + 1) % 3 - 1) * (c < 32 ? 2.0f : 1.0f);
  }
  CHECK(layer.dequantized_weight() == expected);
  // Its forward against a naive float reference: within per-token int8 quantization's half step.
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> x(3, 64);
  for (float& v : x.reshaped()) v = normal(rng);
  const Matrix<float> y = layer.forward(x);
  for (Index b = 0; b < 3; ++b) {
    const double step = double(x.row(b).cwiseAbs().maxCoeff()) / 127.0;
    for (Index o = 0; o < 2; ++o) {
      double exact = 0, weights = 0;
      for (Index c = 0; c < 64; ++c) {
        exact += double(expected(o, c)) * double(x(b, c));
        weights += std::fabs(double(expected(o, c)));
      }
      CHECK(std::fabs(double(y(b, o)) - exact) <= 0.5 * step * weights * (1 + 1e-5) + 1e-6);
    }
  }
}

TEST_CASE("hf files: unit scales the file does not declare, or declares otherwise, are refused by name") {
  // No bitnet_weight_scales: a [2, 2] weight_scale is not read as one scale per tensor.
  const auto undeclared = st::reader::from_bytes(
      group_layer_image(R"({"quant_method": "bitnet", "linear_class": "autobitlinear"})"));
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(undeclared, "fc"),
                       doctest::Contains("\"fc.weight_scale\": has shape [2, 2] (one scale per row or group), but "
                                         "<memory> declares no bitnet_weight_scales"),
                       bitnet::io_error);
  // Declared per_group 64: 64 inputs need [out, 1], the file has [2, 2].
  std::string group64 = group32;
  group64.replace(group64.find("32"), 2, "64");
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(st::reader::from_bytes(group_layer_image(group64)), "fc"),
                       doctest::Contains("declares bitnet_weight_scales \"per_group\" with bitnet_group_size 64: a "
                                         "64-input layer needs floating [out, 1]"),
                       bitnet::io_error);
  // Unit scales are magnitudes: a bitlinear declaration cannot hold them.
  std::string bitlinear = group32;
  bitlinear.replace(bitlinear.find("autobitlinear"), 13, "bitlinear");
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(st::reader::from_bytes(group_layer_image(bitlinear)), "fc"),
                       doctest::Contains("quantization_config.bitnet_weight_scales unit scales are magnitudes d"),
                       bitnet::io_error);
  // A group size outside 32..256, and a rotation bitnet cannot interpret.
  std::string group48 = group32;
  group48.replace(group48.find("32"), 2, "48");
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(st::reader::from_bytes(group_layer_image(group48)), "fc"),
                       doctest::Contains("bitnet_group_size must be 32, 64, 128 or 256"), bitnet::io_error);
  const std::string other_rotation =
      group32.substr(0, group32.size() - 1) + R"(, "bitnet_rotation": {"transform": "random-orthogonal", "block_size": 32, "layers": ["fc"]}})";
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(st::reader::from_bytes(group_layer_image(other_rotation)), "fc"),
                       doctest::Contains("bitnet_rotation.transform names a rotation bitnet cannot apply"),
                       bitnet::io_error);
  const std::string extra_key =
      group32.substr(0, group32.size() - 1) +
      R"(, "bitnet_rotation": {"transform": "normalized-signed-sylvester-walsh-hadamard", "block_size": 32, "layers": ["fc"], "order": "dyadic"}})";
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(st::reader::from_bytes(group_layer_image(extra_key)), "fc"),
                       doctest::Contains("bitnet_rotation.order is not understood"), bitnet::io_error);
  // Declared rotated, but the file has no signs for the layer.
  const std::string rotated =
      group32.substr(0, group32.size() - 1) +
      R"(, "bitnet_rotation": {"transform": "normalized-signed-sylvester-walsh-hadamard", "block_size": 32, "layers": ["fc"]}})";
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(st::reader::from_bytes(group_layer_image(rotated)), "fc"),
                       doctest::Contains("declares \"fc\" rotated (bitnet_rotation), but <memory> has no tensor "
                                         "\"fc.rotation_signs\""),
                       bitnet::io_error);
}

TEST_CASE("hf files: group-scaled and rotated layers round-trip bit for bit through write_packed_layer") {
  scratch_dir dir;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto random = [&](Index rows, Index cols) {
    Matrix<float> m(rows, cols);
    for (float& v : m.reshaped()) v = normal(rng);
    return m;
  };
  bitnet::bitlinear_options ragged{.weight_scales = bitnet::weight_scaling::per_group, .group_size = 64,
                                   .activation_scales = bitnet::activation_scaling::per_block};
  bitnet::bitlinear_options rotated = ragged;
  rotated.rotation = bitnet::hadamard_rotation::random_signs(256, 64, 5);
  const std::vector<std::pair<std::string, BitLinear<float>>> layers{
      {"model.layers.0.mlp.up_proj", BitLinear<float>(random(6, 200), std::nullopt, ragged)},       // last group: 8 columns
      {"model.layers.0.mlp.down_proj", BitLinear<float>(random(5, 256), Vector<float>(random(5, 1)), rotated)}};
  std::vector<st::tensor_spec> specs;
  hf::quantization_config config;
  bool first = true;
  for (const auto& [name, layer] : layers) {
    const hf::packed_layer<float> packed = hf::to_packed(layer);
    hf::declare_packed_layer(specs, name, packed);
    hf::declare_layer(config, name, packed, first);
    first = false;
  }
  CHECK(config.weight_scales == bitnet::weight_scaling::per_group);
  CHECK(config.out_features.at("model.layers.0.mlp.down_proj") == 5);
  REQUIRE(config.rotation);
  CHECK(config.rotation->layers == std::vector<std::string>{"model.layers.0.mlp.down_proj"});
  const fs::path path = dir.path / "groups.safetensors";
  {
    st::writer out(path, specs, {hf::metadata_entry(config)});
    for (const auto& [name, layer] : layers) hf::write_packed_layer(out, name, hf::to_packed(layer));
    out.finish();
  }
  const st::reader file(path);
  CHECK(file.info("model.layers.0.mlp.up_proj.weight_scale").shape == std::vector<std::uint64_t>{6, 4});
  CHECK(file.info("model.layers.0.mlp.down_proj.rotation_signs").type == st::dtype::I8);
  CHECK_FALSE(file.contains("model.layers.0.mlp.up_proj.rotation_signs"));
  const Matrix<float> x = random(3, 256);
  for (const auto& [name, layer] : layers) {
    const BitLinear<float> back = hf::load_bit_linear<float>(file, name);
    CHECK(back.ternary_weight() == layer.ternary_weight());
    CHECK(back.unit_scales() == layer.unit_scales());  // F32: every bit
    CHECK(back.bias() == layer.bias());                 // unit layers store the bias as it is added
    CHECK(back.options().rotation == layer.options().rotation);
    CHECK(back.options().activation_scales == bitnet::activation_scaling::per_block);
    const Matrix<float> input = x.leftCols(layer.in_features());
    CHECK(back.forward(input) == layer.forward(input));
  }
  // Signs in the file that the declaration does not list are refused, not guessed.
  hf::quantization_config unlisted = config;
  unlisted.rotation.reset();
  const fs::path other = dir.path / "unlisted.safetensors";
  {
    st::writer out(other, specs, {hf::metadata_entry(unlisted)});
    for (const auto& [name, layer] : layers) hf::write_packed_layer(out, name, hf::to_packed(layer));
    out.finish();
  }
  const std::string unlisted_message = "\"model.layers.0.mlp.down_proj.rotation_signs\": holds a rotation's signs, but " +
                                       other.string() + " declares no rotation";
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(st::reader(other), "model.layers.0.mlp.down_proj"),
                       doctest::Contains(unlisted_message.c_str()),
                       bitnet::io_error);
  // Unit scales are magnitudes: the bitlinear convention (1 / d) is refused when writing.
  CHECK_THROWS_WITH_AS(hf::to_packed(layers[0].second, hf::scale_convention::bitlinear),
                       doctest::Contains("stores its unit scales d as magnitudes"), bitnet::value_error);
  // One declaration per file: a per_row layer cannot join per_group ones.
  const hf::packed_layer<float> per_row = hf::to_packed(
      BitLinear<float>(random(4, 64), std::nullopt, {.weight_scales = bitnet::weight_scaling::per_row}));
  CHECK_THROWS_WITH_AS(hf::declare_layer(config, "extra", per_row, false),
                       doctest::Contains("extra: the scale granularity (per_row, group_size 0) differs"),
                       bitnet::value_error);
}
