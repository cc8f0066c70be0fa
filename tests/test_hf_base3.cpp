// Base-3 layers in bitnet's packed safetensors form: quantization_config "bitnet_weight_storage":
// "base3", P.weight U8 [out, ceil(in / 5)] (docs/safetensors.md), and what is refused.
#include <bitnet/hf_model.hpp>
#include <bitnet/hf_safetensors.hpp>
#include <bitnet/state_dict.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "file_fixtures.hpp"

namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
namespace fs = std::filesystem;
using bitnet::BitLinear;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;
using bitnet::weight_storage;

namespace {

const bitnet::bitlinear_options base3_options{.storage = weight_storage::base3};

Matrix<float> random_matrix(Index rows, Index cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (float& v : m.reshaped()) v = normal(rng);
  return m;
}

// The layout as docs/safetensors.md states it, written out loop by loop: byte k of row r is
// sum_i (code(r, 5k + i) + 1) * 3^i over the real columns; padding digits 0.
Matrix<std::uint8_t> documented_layout(const Matrix<std::int8_t>& codes) {
  const Index cols = (codes.cols() + 4) / 5;
  Matrix<std::uint8_t> bytes(codes.rows(), cols);
  for (Index r = 0; r < codes.rows(); ++r)
    for (Index k = 0; k < cols; ++k) {
      int value = 0, power = 1;
      for (Index i = 0; i < 5; ++i, power *= 3)
        if (5 * k + i < codes.cols()) value += (codes(r, 5 * k + i) + 1) * power;
      bytes(r, k) = std::uint8_t(value);
    }
  return bytes;
}

bool same_bits(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())) == 0;
}

// Writes `layers` (name, layer) to `path` as hf::to_packed packs them, with their declaration.
void write_layers(const fs::path& path, const std::vector<std::pair<std::string, BitLinear<float>>>& layers,
                  hf::scale_convention convention = hf::default_scale_convention) {
  std::vector<st::tensor_spec> specs;
  hf::quantization_config config;
  config.linear_class = convention;
  bool first = true;
  for (const auto& [name, layer] : layers) {
    const hf::packed_layer<float> packed = hf::to_packed(layer, convention);
    hf::declare_packed_layer(specs, name, packed);
    hf::declare_layer(config, name, packed, first);
    first = false;
  }
  st::writer out(path, specs, {hf::metadata_entry(config)});
  for (const auto& [name, layer] : layers) hf::write_packed_layer(out, name, hf::to_packed(layer, convention));
  out.finish();
}

// A file with one layer "fc": U8 weight `bytes` (shape as given), F32 scale 0.5, and `config` as
// its quantization_config text.
std::vector<std::uint8_t> hand_file(const std::vector<std::uint64_t>& shape, const std::vector<std::uint8_t>& bytes,
                                    const std::string& config, std::optional<Index> bias = std::nullopt) {
  file_fixtures::scratch_dir scratch("bitnet_base3_hand_");
  const fs::path path = scratch / "fc.safetensors";
  std::vector<st::tensor_spec> specs{{"fc.weight", st::dtype::U8, shape}, {"fc.weight_scale", st::dtype::F32, {1}}};
  if (bias) specs.push_back({"fc.bias", st::dtype::F32, {std::uint64_t(*bias)}});
  {
    st::writer out(path, specs, {{"quantization_config", config}});
    out.write_values<std::uint8_t>("fc.weight", bytes);
    const float scale[1] = {0.5f};
    out.write_values<float>("fc.weight_scale", scale);
    if (bias) out.write("fc.bias", Vector<float>(Vector<float>::Zero(*bias)));
    out.finish();
  }
  const std::string text = file_fixtures::read_text(path);
  return {text.begin(), text.end()};
}

st::reader reader_of(const std::vector<std::uint8_t>& image) {
  std::vector<std::byte> bytes(image.size());
  std::memcpy(bytes.data(), image.data(), image.size());
  return st::reader::from_bytes(std::move(bytes));
}

const std::string base3_config =
    R"({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline", "bitnet_weight_storage": "base3", "bitnet_in_features": {"fc": 7}})";

}  // namespace

TEST_CASE("hf base3: the file layout of two 7-column rows, computed by hand") {
  // Row 0: 1 0 -1 1 0 | 0 1   codes 2 1 0 2 1 | 1 2   bytes 2 + 3 + 0 + 54 + 81 = 140, 1 + 6 = 7
  // Row 1: -1 -1 1 0 0 | 1 -1 codes 0 0 2 1 1 | 2 0   bytes 0 + 0 + 18 + 27 + 81 = 126, 2 + 0 = 2
  Matrix<std::int8_t> codes(2, 7);
  codes << 1, 0, -1, 1, 0, 0, 1,  //
      -1, -1, 1, 0, 0, 1, -1;
  Matrix<std::uint8_t> expected(2, 2);
  expected << 140, 7, 126, 2;
  CHECK(hf::pack_weights_base3(codes) == expected);
  CHECK(hf::unpack_weights_base3(expected, 7) == codes);
  CHECK(hf::base3_packed_cols(7) == 2);
  CHECK(hf::base3_packed_cols(5) == 1);
  CHECK(hf::packed_weight_shape(weight_storage::base3, 2, 7) == std::vector<std::uint64_t>{2, 2});
  CHECK(hf::packed_weight_shape(weight_storage::two_bit, 5, 7) == std::vector<std::uint64_t>{2, 7});
  // Every value of one byte: five columns of 3^5 combinations, against the documented formula.
  Matrix<std::int8_t> all(243, 5);
  for (int v = 0; v < 243; ++v)
    for (int i = 0, rest = v; i < 5; ++i, rest /= 3) all(v, i) = std::int8_t(rest % 3 - 1);
  const Matrix<std::uint8_t> bytes = hf::pack_weights_base3(all);
  for (int v = 0; v < 243; ++v) CHECK(int(bytes(v, 0)) == v);
  CHECK(hf::unpack_weights_base3(bytes, 5) == all);

  // The file form: the same bytes under "fc.weight", read back as a base-3 layer.
  const st::reader file = reader_of(hand_file({2, 2}, {140, 7, 126, 2}, base3_config));
  const BitLinear<float> layer = hf::load_bit_linear<float>(file, "fc");
  CHECK(layer.options().storage == weight_storage::base3);
  CHECK(layer.ternary_weight() == codes);
  CHECK(layer.in_features() == 7);
  CHECK(layer.out_features() == 2);
  CHECK(layer.weight_scale() == 2.0f);  // autobitlinear: 1 / 0.5

  // What the unpacker refuses: a byte above 242, a padding digit that is not 0, the wrong width.
  Matrix<std::uint8_t> high = expected;
  high(1, 0) = 243;
  CHECK_THROWS_WITH_AS(hf::unpack_weights_base3(high, 7), doctest::Contains("packed row 1, byte 0 is 243, above 242"),
                       bitnet::value_error);
  Matrix<std::uint8_t> padded = expected;
  padded(0, 1) = 7 + 9;  // digit 2 (column 7) set
  CHECK_THROWS_WITH_AS(hf::unpack_weights_base3(padded, 7),
                       doctest::Contains("padding digit 2 of packed row 0, byte 1 (column 7, past the 7 inputs) holds "
                                         "code 1, expected 0"),
                       bitnet::value_error);
  CHECK_THROWS_AS(hf::unpack_weights_base3(expected, 11), bitnet::shape_error);
  CHECK_THROWS_AS(hf::unpack_weights_base3(expected, 5), bitnet::shape_error);
  CHECK_THROWS_AS(hf::pack_weights_base3(Matrix<std::int8_t>::Constant(1, 3, 2)), bitnet::value_error);
}

TEST_CASE("hf base3: ragged layers round-trip bit for bit (codes, scale, outputs) and match the 2-bit file") {
  file_fixtures::scratch_dir dir("bitnet_base3_roundtrip_");
  std::mt19937 rng(17);
  for (const hf::scale_convention convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear}) {
    std::vector<std::pair<std::string, BitLinear<float>>> base3, two_bit;
    const std::vector<std::pair<Index, Index>> shapes{{1, 1}, {17, 7}, {5, 23}, {33, 67}, {16, 20}, {3, 2563}};
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const auto [out, in] = shapes[i];
      const Matrix<float> w = random_matrix(out, in, rng);
      std::optional<Vector<float>> bias;
      if (i % 2) bias = Vector<float>(random_matrix(out, 1, rng));
      const std::string name = "model.layers." + std::to_string(i) + ".proj";
      base3.emplace_back(name, BitLinear<float>(w, bias, base3_options));
      two_bit.emplace_back(name, BitLinear<float>(w, bias));
    }
    // A rotated base-3 layer (96 inputs: not a multiple of 5, a whole number of 32-blocks).
    bitnet::bitlinear_options rotated = base3_options;
    rotated.rotation = bitnet::hadamard_rotation::random_signs(96, 32, 4);
    const Matrix<float> w = random_matrix(9, 96, rng);
    base3.emplace_back("model.rotated", BitLinear<float>(w, std::nullopt, rotated));
    rotated.storage = weight_storage::two_bit;
    two_bit.emplace_back("model.rotated", BitLinear<float>(w, std::nullopt, rotated));

    write_layers(dir / "base3.safetensors", base3, convention);
    write_layers(dir / "two_bit.safetensors", two_bit, convention);
    const st::reader file(dir / "base3.safetensors");
    const st::reader twin(dir / "two_bit.safetensors");
    const hf::quantization_config declared = *hf::declared_quantization(file);
    CHECK(declared.storage == weight_storage::base3);
    CHECK(declared.in_features.at("model.layers.1.proj") == 7);  // 7, 23, 67, 2563, 96: ragged
    CHECK(declared.in_features.at("model.rotated") == 96);
    CHECK_FALSE(declared.in_features.contains("model.layers.4.proj"));  // 20 = 4 x 5
    CHECK(declared.in_features.at("model.layers.0.proj") == 1);
    CHECK(declared.out_features.empty());  // one packed row per output: exact
    CHECK(hf::declared_quantization(twin)->storage == weight_storage::two_bit);

    std::uint64_t base3_bytes = 0, two_bit_bytes = 0;
    for (std::size_t i = 0; i < base3.size(); ++i) {
      const auto& [name, saved] = base3[i];
      const st::tensor_info& weight = file.info(name + ".weight");
      CHECK(weight.type == st::dtype::U8);
      CHECK(weight.shape == std::vector<std::uint64_t>{std::uint64_t(saved.out_features()),
                                                       std::uint64_t((saved.in_features() + 4) / 5)});
      CHECK(file.read_matrix<std::uint8_t>(name + ".weight") == documented_layout(saved.ternary_weight()));
      base3_bytes += weight.byte_size();
      two_bit_bytes += twin.info(name + ".weight").byte_size();

      const BitLinear<float> loaded = hf::load_bit_linear<float>(file, name);
      const BitLinear<float> loaded_two_bit = hf::load_bit_linear<float>(twin, name);
      CHECK(loaded.options().storage == weight_storage::base3);
      CHECK(loaded_two_bit.options().storage == weight_storage::two_bit);
      CHECK(loaded.ternary_weight() == saved.ternary_weight());
      CHECK(loaded.base3_weight() == saved.base3_weight());
      CHECK(loaded.weight_scale() == saved.weight_scale());
      CHECK(loaded.weight_scale() == loaded_two_bit.weight_scale());
      CHECK(loaded.bias() == loaded_two_bit.bias());
      CHECK(loaded.options().rotation == saved.options().rotation);
      const Matrix<float> x = random_matrix(3, saved.in_features(), rng);
      CHECK(same_bits(loaded.forward(x), loaded_two_bit.forward(x)));
      if (convention == hf::scale_convention::bitlinear) CHECK(same_bits(loaded.forward(x), saved.forward(x)));
      // Written again, the reloaded layer gives the same bytes.
      CHECK(hf::to_packed(loaded, convention).weight == hf::to_packed(saved, convention).weight);
    }
    // Sum of out x ceil(in / 5) against ceil(out / 4) x in over the shapes above (the padding of
    // ragged rows makes the 2-bit form larger here than 2 bits a weight).
    CHECK(base3_bytes == 1 + 17 * 2 + 5 * 5 + 33 * 14 + 16 * 4 + 3 * 513 + 9 * 20);
    CHECK(two_bit_bytes == 1 + 5 * 7 + 2 * 23 + 9 * 67 + 4 * 20 + 1 * 2563 + 3 * 96);
  }
  // A layer of a real width: exactly 0.8 of the 2-bit bytes (2560 inputs, 16 outputs).
  {
    const BitLinear<float> wide(random_matrix(16, 2560, rng), std::nullopt, base3_options);
    CHECK(hf::to_packed(wide).weight.size() * 10 ==
          hf::to_packed(wide, hf::default_scale_convention, weight_storage::two_bit).weight.size() * 8);
  }
}

TEST_CASE("hf base3: a file whose declaration contradicts its tensors is refused with the file, tensor and reason") {
  const auto refused = [](const std::vector<std::uint8_t>& image, const std::string& expected) {
    const st::reader file = reader_of(image);
    CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(file, "fc"), doctest::Contains(expected.c_str()), bitnet::error);
  };
  const std::vector<std::uint8_t> good{140, 7, 126, 2};
  // A byte above 242 and a padding digit that is not 0.
  refused(hand_file({2, 2}, {140, 7, 243, 2}, base3_config),
          "<memory>: tensor \"fc.weight\": hf::unpack_weights_base3: packed row 1, byte 0 is 243, above 242");
  refused(hand_file({2, 2}, {140, 7, 126, 2 + 27}, base3_config),
          "tensor \"fc.weight\": hf::unpack_weights_base3: padding digit 3 of packed row 1, byte 1");
  // The wrong shape: one dimension, and columns that cannot hold the declared 7 inputs.
  refused(hand_file({4}, good, base3_config),
          "tensor \"fc.weight\": is U8 [4], but <memory> declares bitnet_weight_storage \"base3\"");
  refused(hand_file({1, 4}, good, base3_config),
          "tensor \"fc.weight\": has 4 packed columns, but <memory> declares bitnet_in_features 7");
  // out_features from the bias must be the rows.
  refused(hand_file({2, 2}, good, base3_config, 3), "one packed row per output");
  // Undeclared: a base-3 weight (with its bias: 2 outputs) read as transformers' 2-bit layout.
  const std::string undeclared = R"({"quant_method": "bitnet", "linear_class": "autobitlinear"})";
  refused(hand_file({2, 2}, good, undeclared, 2),
          "tensor \"fc.weight\": has 2 packed rows and the bias 2 elements, inconsistent with 2 output features (a "
          "base-3 weight, U8 [out, ceil(in / 5)], would have these rows, but <memory> declares no "
          "bitnet_weight_storage \"base3\")");
  // Declarations that cannot be read: an unknown storage, base3 with unit scales, in_features without base3.
  std::string base4 = base3_config;
  base4.replace(base4.find("\"base3\""), 7, "\"base4\"");
  refused(hand_file({2, 2}, good, base4), "quantization_config.bitnet_weight_storage must be \"two_bit\" or \"base3\"");
  std::string grouped = base3_config;
  grouped.insert(grouped.size() - 1, R"(, "bitnet_weight_scales": "per_row")");
  refused(hand_file({2, 2}, good, grouped),
          "quantization_config.bitnet_weight_storage \"base3\" needs per_tensor weight scales");
  std::string two_bit_in = base3_config;
  two_bit_in.replace(two_bit_in.find("\"base3\""), 7, "\"two_bit\"");
  refused(hand_file({2, 7}, std::vector<std::uint8_t>(14, 0x55), two_bit_in),
          "quantization_config.bitnet_in_features is given, but bitnet_weight_storage is not \"base3\"");
  std::string bad_in = base3_config;
  bad_in.replace(bad_in.find("7}"), 1, "0");
  refused(hand_file({2, 2}, good, bad_in), "quantization_config.bitnet_in_features must map layer names to positive integers");
  // The same bytes, correctly declared, load.
  CHECK(hf::load_bit_linear<float>(reader_of(hand_file({2, 2}, good, base3_config)), "fc").in_features() == 7);
  // Without bitnet_in_features, 2 packed columns are 10 inputs: the padding digits are then codes.
  std::string no_in = base3_config;
  no_in.erase(no_in.find(", \"bitnet_in_features\""), std::string(", \"bitnet_in_features\": {\"fc\": 7}").size());
  CHECK(hf::load_bit_linear<float>(reader_of(hand_file({2, 2}, good, no_in)), "fc").in_features() == 10);
}

TEST_CASE("hf base3: writers refuse unit-scaled base 3 and mixed storage; 2-bit files are unchanged") {
  std::mt19937 rng(5);
  const Matrix<float> w = random_matrix(6, 64, rng);
  const BitLinear<float> grouped(w, std::nullopt,
                                 {.weight_scales = bitnet::weight_scaling::per_group, .group_size = 32});
  CHECK_THROWS_WITH_AS(hf::to_packed(grouped, hf::scale_convention::autobitlinear, weight_storage::base3),
                       doctest::Contains("storage base3 needs per_tensor weight scales, got per_group"),
                       bitnet::value_error);
  // to_packed's storage: the layer's own by default, or the one asked for.
  const BitLinear<float> b3(w, std::nullopt, base3_options), b2(w);
  CHECK(hf::to_packed(b3).storage == weight_storage::base3);
  CHECK(hf::to_packed(b3, hf::default_scale_convention, weight_storage::two_bit).weight == hf::to_packed(b2).weight);
  CHECK(hf::to_packed(b2, hf::default_scale_convention, weight_storage::base3).weight == hf::to_packed(b3).weight);
  // One declaration per file: a base-3 and a 2-bit layer cannot share it.
  hf::quantization_config config;
  hf::declare_layer(config, "a", hf::to_packed(b3), true);
  CHECK_THROWS_WITH_AS(hf::declare_layer(config, "b", hf::to_packed(b2), false),
                       doctest::Contains("b: the weight storage (two_bit) differs"), bitnet::value_error);

  // A default (2-bit) layer's file, byte for byte what it was before base 3 had a file form: the
  // BitNet declaration with no bitnet_* key, transformers' packed bytes.
  file_fixtures::scratch_dir dir("bitnet_base3_default_");
  write_layers(dir / "saved.safetensors", {{"fc", b2}});
  {
    const Matrix<std::uint8_t> packed = hf::pack_weights(b2.ternary_weight());
    st::writer out(dir / "by_hand.safetensors",
                   {{"fc.weight", st::dtype::U8, {2, 64}}, {"fc.weight_scale", st::dtype::F32, {1}}},
                   {{"quantization_config",
                     R"({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline", )"
                     R"("modules_to_not_convert": null, "use_rms_norm": false, "rms_norm_eps": 1e-06, )"
                     R"("bitnet_out_features": {"fc": 6}})"}});
    out.write("fc.weight", packed);
    const float mean[1] = {hf::to_packed(b2).weight_scale};
    out.write_values<float>("fc.weight_scale", mean);
    out.finish();
  }
  CHECK(file_fixtures::read_text(dir / "saved.safetensors") == file_fixtures::read_text(dir / "by_hand.safetensors"));
}

namespace {
struct base3_block {
  std::optional<BitLinear<float>> up, down;
};
BITNET_LAYERS(base3_block, up, down);
}  // namespace

TEST_CASE("hf base3: save_state_dict / load_state_dict keep the storage, and a refused save writes nothing") {
  file_fixtures::scratch_dir dir("bitnet_base3_state_");
  std::mt19937 rng(8);
  base3_block model;
  model.up.emplace(random_matrix(18, 23, rng), Vector<float>(random_matrix(18, 1, rng)), base3_options);
  model.down.emplace(random_matrix(7, 40, rng), std::nullopt, base3_options);
  bitnet::save_state_dict(model, dir / "m.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
  const st::reader file(dir / "m.safetensors");
  const hf::quantization_config declared = *hf::declared_quantization(file);
  CHECK(declared.storage == weight_storage::base3);
  CHECK(declared.in_features == std::map<std::string, Index, std::less<>>{{"up", 23}});
  CHECK(file.info("up.weight").shape == std::vector<std::uint64_t>{18, 5});
  CHECK(file.read_matrix<std::uint8_t>("down.weight") == documented_layout(model.down->ternary_weight()));

  const auto same_layer = [&](const BitLinear<float>& loaded, const BitLinear<float>& saved) {
    CHECK(loaded.options().storage == weight_storage::base3);
    CHECK(loaded.ternary_weight() == saved.ternary_weight());
    CHECK(loaded.weight_scale() == saved.weight_scale());
    const Matrix<float> x = random_matrix(2, saved.in_features(), rng);
    const BitLinear<float> two_bit =
        BitLinear<float>::from_ternary(saved.ternary_weight(), saved.weight_scale(), loaded.bias());
    CHECK(same_bits(loaded.forward(x), two_bit.forward(x)));
  };
  base3_block empty;  // empty slots take the file's shapes and storage
  bitnet::load_state_dict(empty, dir / "m.safetensors");
  same_layer(*empty.up, *model.up);
  same_layer(*empty.down, *model.down);
  base3_block existing;  // existing 2-bit layers of the same shapes: the file's storage
  existing.up.emplace(Matrix<float>::Ones(18, 23), Vector<float>::Zero(18));
  existing.down.emplace(Matrix<float>::Ones(7, 40));
  bitnet::load_state_dict(existing, dir / "m.safetensors");
  same_layer(*existing.up, *model.up);
  same_layer(*existing.down, *model.down);
  // An existing layer whose in_features differs from the declared one is refused, and stays as it was.
  base3_block wider;
  wider.up.emplace(Matrix<float>::Ones(18, 25), Vector<float>::Zero(18));  // 25 inputs: also 5 packed columns
  wider.down.emplace(Matrix<float>::Ones(7, 40));
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(wider, dir / "m.safetensors"),
                       doctest::Contains("size mismatch for \"up.weight\": the file declares 23 input features"),
                       bitnet::io_error);
  CHECK(wider.up->options().storage == weight_storage::two_bit);
  CHECK(wider.up->in_features() == 25);

  // A byte above 242 in a saved file: refused by file, key and byte; the empty slots stay empty.
  {
    std::vector<st::tensor_spec> specs;
    for (const st::tensor_info& t : file.tensors()) specs.push_back({t.name, t.type, t.shape});
    st::writer out(dir / "bad.safetensors", specs, {file.metadata().begin(), file.metadata().end()});
    for (const st::tensor_info& t : file.tensors()) {
      std::vector<std::byte> bytes = file.read_bytes(t.name);
      if (t.name == "down.weight") bytes[9] = std::byte{250};  // row 1, byte 1
      out.write_bytes(t.name, bytes);
    }
    out.finish();
  }
  base3_block untouched;
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(untouched, dir / "bad.safetensors"),
                       doctest::Contains("\"down.weight\": hf::unpack_weights_base3: packed row 1, byte 1 is 250"),
                       bitnet::io_error);
  CHECK_FALSE(untouched.up);
  CHECK_FALSE(untouched.down);

  // A 2-bit file into base-3 layers keeps the layers' storage (the in-memory choice).
  base3_block two_bit_model;
  two_bit_model.up.emplace(random_matrix(18, 23, rng), Vector<float>::Zero(18));
  two_bit_model.down.emplace(random_matrix(7, 40, rng));
  bitnet::save_state_dict(two_bit_model, dir / "t.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
  CHECK(st::reader(dir / "t.safetensors").info("up.weight").shape == std::vector<std::uint64_t>{5, 23});
  bitnet::load_state_dict(model, dir / "t.safetensors");
  CHECK(model.up->options().storage == weight_storage::base3);
  CHECK(model.up->ternary_weight() == two_bit_model.up->ternary_weight());

  // Layers of both storages cannot share one declaration: refused before anything is written.
  base3_block mixed = model;
  mixed.down.emplace(random_matrix(7, 40, rng));
  CHECK_THROWS_WITH_AS(
      bitnet::save_state_dict(mixed, dir / "mixed.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed}),
      doctest::Contains("the BitLinear at \"down\" cannot share the file's declaration"), bitnet::state_error);
  CHECK_FALSE(fs::exists(dir / "mixed.safetensors"));
  for (const auto& entry : fs::directory_iterator(dir.path))
    CHECK(entry.path().filename().string().find("tmp") == std::string::npos);
}

TEST_CASE("hf base3: a model folder whose files disagree on the storage is refused") {
  file_fixtures::scratch_dir dir("bitnet_base3_folder_");
  std::mt19937 rng(9);
  fs::create_directories(dir / "m");
  write_layers(dir / "m" / "model.safetensors", {{"fc", BitLinear<float>(random_matrix(4, 10, rng), std::nullopt,
                                                                         base3_options)}});
  file_fixtures::write_text(dir / "m" / "config.json",
                            R"({"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear"}})");
  CHECK_THROWS_WITH_AS(hf::checkpoint(dir / "m"),
                       doctest::Contains("bitnet_weight_storage \"two_bit\""), bitnet::io_error);
  file_fixtures::write_text(
      dir / "m" / "config.json",
      R"({"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "bitnet_weight_storage": "base3"}})");
  const hf::checkpoint model(dir / "m");
  const BitLinear<float> layer = hf::load_bit_linear<float>(model, "fc");
  CHECK(layer.options().storage == weight_storage::base3);
  CHECK(layer.in_features() == 10);
}
