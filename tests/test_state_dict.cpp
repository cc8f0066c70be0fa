#include <bitnet/state_dict.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <bitnet/replace.hpp>

#include "graph_fixtures.hpp"

namespace st = bitnet::safetensors;
namespace hf = bitnet::hf;
namespace fs = std::filesystem;
using namespace fixtures;

namespace {

struct scratch_dir {
  fs::path path;
  scratch_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("bitnet_state_dict_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

// The values of a snapshot without the buffer addresses: what a round trip must reproduce.
std::vector<slot_state> values_of(std::vector<slot_state> states) {
  for (auto& s : states) s.weight_data = s.bias_data = nullptr;
  return states;
}

// Ternary codes and scale of every BitLinear of a transformer.
std::vector<std::pair<Matrix<std::int8_t>, float>> ternary_of(transformer& t) {
  std::vector<std::pair<Matrix<std::int8_t>, float>> out;
  for (slot* s : slots_of(t))
    if (const auto* bit = std::get_if<BitLinear<float>>(s)) out.emplace_back(bit->ternary_weight(), bit->weight_scale());
  return out;
}

std::string message_of(auto&& action) {
  try {
    action();
  } catch (const bitnet::io_error& e) {
    return e.what();
  }
  FAIL("expected a bitnet::io_error");
  return {};
}

// A graph of the remaining built-in shapes and user linear types (fixed members: loading writes
// through their views).
struct mixed_graph {
  std::map<std::string, slot> heads;
  std::deque<Linear<double>> stack;
  std::vector<slot> pair;
  user::dense_colmajor colmajor;
  user::flat_dense flat;
  thirdparty::Dense dense;
};
BITNET_LAYERS(mixed_graph, heads, stack, pair, colmajor, flat, dense);

mixed_graph make_mixed(unsigned seed) {
  std::mt19937 rng(seed);
  mixed_graph g;
  g.heads.emplace("cls", random_linear<float>(4, 3, rng));
  g.heads.emplace("reg", random_linear<float>(4, 1, rng, false));
  g.stack.push_back(random_linear<double>(3, 5, rng));
  g.stack.push_back(random_linear<double>(5, 2, rng, false));
  g.pair = {slot(random_linear<float>(2, 2, rng)), slot(random_linear<float>(2, 3, rng))};
  g.colmajor.weight = reference::random_matrix<double>(3, 4, rng).cast<double>();
  g.colmajor.bias = reference::random_matrix<double>(3, 1, rng);
  g.flat = {4, 2, {}};
  for (int i = 0; i < 8; ++i) g.flat.values.push_back(float(i) * 0.25f - 1);
  g.dense.kernel = reference::random_matrix<float>(5, 3, rng);  // in x out
  return g;
}

std::vector<std::vector<unsigned char>> bytes_of_mixed(mixed_graph& g) {
  std::vector<std::vector<unsigned char>> out;
  for (auto& [name, s] : g.heads) {
    const auto state = state_of(name, s);
    out.push_back(state.weight_bytes);
    out.push_back(state.bias_bytes);
  }
  for (auto& l : g.stack) {
    out.push_back(bytes_of(l.weight));
    if (l.bias) out.push_back(bytes_of(*l.bias));
  }
  for (auto& s : g.pair) out.push_back(state_of("", s).weight_bytes);
  out.push_back(bytes_of(g.colmajor.weight));
  out.push_back(bytes_of(g.colmajor.bias));
  out.push_back(bytes_of(Eigen::Map<const Eigen::VectorXf>(g.flat.values.data(), Index(g.flat.values.size()))));
  out.push_back(bytes_of(g.dense.kernel));
  return out;
}

}  // namespace

TEST_CASE("state dict: save then load into a fresh graph restores every weight bit (BITNET_LAYERS, vector, variant)") {
  scratch_dir dir;
  transformer source = make_transformer(3, 6, 1);
  bitnet::save_state_dict(source, dir / "t.safetensors");

  const st::reader file(dir / "t.safetensors");
  CHECK(file.tensors().size() == 3 * 6 + 2 - 1);  // block 1 has no attn bias
  CHECK(file.contains("blocks.2.mlp.down.weight"));
  CHECK(file.info("blocks.2.mlp.down.weight").shape == std::vector<std::uint64_t>{6, 12});
  CHECK_FALSE(file.contains("blocks.1.attn.bias"));
  CHECK(file.read_matrix<float>("head.weight") == std::get<Linear<float>>(source.head).weight);

  transformer target = make_transformer(3, 6, 2);
  REQUIRE(values_of(snapshot(target)) != values_of(snapshot(source)));
  const auto report = bitnet::load_state_dict(target, file);
  CHECK(values_of(snapshot(target)) == values_of(snapshot(source)));
  CHECK(report.loaded.size() == 19);
  CHECK(report.missing.empty());
  CHECK(report.unexpected.empty());
}

TEST_CASE("state dict: round trip of BitLinear layers keeps the latent weights, the codes and the scales") {
  scratch_dir dir;
  transformer source = make_transformer(2, 7, 3);
  bitnet::replace_linear(source);
  bitnet::save_state_dict(source, dir / "bit.safetensors");

  transformer target = make_transformer(2, 7, 4);
  bitnet::replace_linear(target);
  bitnet::load_state_dict(target, dir / "bit.safetensors");
  CHECK(values_of(snapshot(target)) == values_of(snapshot(source)));
  CHECK(ternary_of(target) == ternary_of(source));
}

TEST_CASE("state dict: a polymorphic unique_ptr module tree, before and after conversion") {
  scratch_dir dir;
  auto source = make_module_tree(5);
  bitnet::save_state_dict(*source, dir / "tree.safetensors");
  CHECK(st::reader(dir / "tree.safetensors").contains("layers.1.o.weight"));
  CHECK_FALSE(st::reader(dir / "tree.safetensors").contains("layers.1.o.bias"));

  auto target = make_module_tree(6);
  bitnet::load_state_dict(*target, dir / "tree.safetensors");
  CHECK(values_of(snapshot(*target)) == values_of(snapshot(*source)));

  // Converted trees: the BitLinear nodes are found through bitnet_as_bit_linear.
  bitnet::replace_linear(*source);
  bitnet::save_state_dict(*source, dir / "bit_tree.safetensors");
  auto converted = make_module_tree(7);
  bitnet::replace_linear(*converted);
  bitnet::load_state_dict(*converted, dir / "bit_tree.safetensors");
  CHECK(values_of(snapshot(*converted)) == values_of(snapshot(*source)));
}

TEST_CASE("state dict: maps, deques, arrays and user linear types (column-major, flat storage, traits)") {
  scratch_dir dir;
  mixed_graph source = make_mixed(8);
  bitnet::save_state_dict(source, dir / "mixed.safetensors");
  const st::reader file(dir / "mixed.safetensors");
  CHECK(file.info("stack.0.weight").type == st::dtype::F64);
  CHECK(file.info("heads.cls.weight").type == st::dtype::F32);
  // Each layer is stored out x in, whatever its own layout.
  CHECK(file.read_matrix<double>("colmajor.weight") == source.colmajor.weight);
  CHECK(file.read_matrix<float>("dense.weight") == source.dense.kernel.transpose());
  CHECK(file.read_matrix<float>("flat.weight")(1, 3) == source.flat.values[7]);

  mixed_graph target = make_mixed(9);
  REQUIRE(bytes_of_mixed(target) != bytes_of_mixed(source));
  const void* flat_buffer = target.flat.values.data();
  bitnet::load_state_dict(target, file);
  CHECK(bytes_of_mixed(target) == bytes_of_mixed(source));
  CHECK(target.flat.values.data() == flat_buffer);  // written in place
}

TEST_CASE("state dict: a single layer as the graph has the keys weight and bias") {
  scratch_dir dir;
  std::mt19937 rng(10);
  Linear<float> layer = random_linear<float>(3, 2, rng);
  bitnet::save_state_dict(layer, dir / "one.safetensors", {.prefix = "fc."});
  const st::reader file(dir / "one.safetensors");
  CHECK(file.contains("fc.weight"));
  CHECK(file.contains("fc.bias"));
  Linear<float> other = random_linear<float>(3, 2, rng);
  bitnet::load_state_dict(other, file, {.prefix = "fc."});
  CHECK(other.weight == layer.weight);
  CHECK(*other.bias == *layer.bias);
}

TEST_CASE("state dict: a prefix is put in front of every key; other tensors are outside the graph") {
  scratch_dir dir;
  transformer source = make_transformer(1, 4, 11);
  bitnet::save_state_dict(source, dir / "p.safetensors", {.prefix = "model."});
  {
    const st::reader file(dir / "p.safetensors");
    for (const auto& t : file.tensors()) CHECK(t.name.starts_with("model."));
    CHECK(file.contains("model.blocks.0.mlp.up.weight"));
  }
  // A checkpoint with the model plus tensors outside the prefix (an embedding): the prefix selects.
  {
    const st::reader saved(dir / "p.safetensors");
    std::vector<st::tensor_spec> specs;
    for (const auto& t : saved.tensors()) specs.push_back({t.name, t.type, t.shape});
    specs.push_back({"embed.weight", st::dtype::F32, {2, 2}});
    st::writer out(dir / "full.safetensors", specs);
    for (const auto& t : saved.tensors()) out.copy_tensor(t.name, saved, t.name);
    out.write("embed.weight", Matrix<float>::Zero(2, 2).eval());
    out.finish();
  }
  transformer target = make_transformer(1, 4, 12);
  bitnet::load_state_dict(target, dir / "full.safetensors", {.prefix = "model."});
  CHECK(values_of(snapshot(target)) == values_of(snapshot(source)));

  // Without the prefix every key is missing and every tensor unexpected.
  transformer other = make_transformer(1, 4, 13);
  const auto before = snapshot(other);
  const std::string text = message_of([&] { bitnet::load_state_dict(other, dir / "full.safetensors"); });
  CHECK(text.find("missing key \"blocks.0.attn.weight\"") != std::string::npos);
  CHECK(text.find("unexpected key \"model.blocks.0.attn.weight\"") != std::string::npos);
  CHECK(text.find("unexpected key \"embed.weight\"") != std::string::npos);
  CHECK(snapshot(other) == before);
}

namespace {

// Writes a file with the given tensors (F32 unless said), values from a counter.
void write_file(const fs::path& path, const std::vector<st::tensor_spec>& specs) {
  st::writer out(path, specs);
  float next = 0.125f;
  for (const auto& spec : specs) {
    std::uint64_t n = 1;
    for (auto d : spec.shape) n *= d;
    std::vector<float> values(n);
    for (auto& v : values) v = (next += 0.0625f);
    if (spec.type == st::dtype::U8 || spec.type == st::dtype::I32) {
      std::vector<std::int32_t> codes(n, 0);
      out.write_values<std::int32_t>(spec.name, codes);
    } else {
      out.write_values<float>(spec.name, values);
    }
  }
  out.finish();
}

}  // namespace

TEST_CASE("state dict: strict mode lists every missing key, unexpected key and mismatch in one error") {
  scratch_dir dir;
  transformer graph = make_transformer(1, 4, 14);  // attn 4x4+b, up 8x4+b, down 4x8+b, head 3x4+b
  const auto before = snapshot(graph);
  write_file(dir / "bad.safetensors", {
                                          {"blocks.0.attn.weight", st::dtype::F32, {4, 4}},
                                          {"blocks.0.attn.bias", st::dtype::F32, {4}},
                                          {"blocks.0.mlp.up.weight", st::dtype::F32, {4, 8}},   // transposed
                                          {"blocks.0.mlp.up.bias", st::dtype::I32, {8}},        // not floating
                                          {"blocks.0.mlp.down.weight", st::dtype::F32, {4, 8}},
                                          // blocks.0.mlp.down.bias missing
                                          {"head.weight", st::dtype::F32, {3, 4}},
                                          {"head.bias", st::dtype::F32, {3}},
                                          {"head.extra", st::dtype::F32, {1}},
                                          {"blocks.0.norm.weight", st::dtype::F32, {4}},
                                      });
  const std::string text = message_of([&] { bitnet::load_state_dict(graph, dir / "bad.safetensors"); });
  CHECK(text.find("5 error(s) in loading the state dict") != std::string::npos);
  CHECK(text.find("missing key \"blocks.0.mlp.down.bias\"") != std::string::npos);
  CHECK(text.find("unexpected key \"head.extra\"") != std::string::npos);
  CHECK(text.find("unexpected key \"blocks.0.norm.weight\"") != std::string::npos);
  CHECK(text.find("size mismatch for \"blocks.0.mlp.up.weight\": the file has F32 [4, 8], the layer needs floating [8, 4]") !=
        std::string::npos);
  CHECK(text.find("size mismatch for \"blocks.0.mlp.up.bias\": the file has I32 [8]") != std::string::npos);
  CHECK(text.find("bad.safetensors") != std::string::npos);
  CHECK(snapshot(graph) == before);

  // Non-strict: mismatches are still errors (as in PyTorch).
  const std::string lenient =
      message_of([&] { bitnet::load_state_dict(graph, dir / "bad.safetensors", {.strict = false}); });
  CHECK(lenient.find("2 error(s)") != std::string::npos);
  CHECK(lenient.find("missing key") == std::string::npos);
  CHECK(snapshot(graph) == before);
}

TEST_CASE("state dict: non-strict loads what matches and reports the rest") {
  scratch_dir dir;
  transformer source = make_transformer(1, 4, 15);
  bitnet::save_state_dict(source, dir / "full.safetensors");
  {
    const st::reader full(dir / "full.safetensors");
    std::vector<st::tensor_spec> specs{{"head.weight", st::dtype::F32, {3, 4}},
                                       {"blocks.0.mlp.up.bias", st::dtype::F32, {8}},
                                       {"decoder.weight", st::dtype::F32, {1, 1}}};
    st::writer out(dir / "part.safetensors", specs);
    out.copy_tensor("head.weight", full, "head.weight");
    out.copy_tensor("blocks.0.mlp.up.bias", full, "blocks.0.mlp.up.bias");
    out.write("decoder.weight", Matrix<float>::Ones(1, 1).eval());
    out.finish();
  }
  transformer target = make_transformer(1, 4, 16);
  const auto before = values_of(snapshot(target));
  const auto report = bitnet::load_state_dict(target, dir / "part.safetensors", {.strict = false});
  CHECK(report.loaded == std::vector<std::string>{"blocks.0.mlp.up.bias", "head.weight"});
  CHECK(report.unexpected == std::vector<std::string>{"decoder.weight"});
  CHECK(report.missing.size() == 6);

  const auto after = values_of(snapshot(target));
  const auto expected = values_of(snapshot(source));
  // slots: attn, up, down, head
  CHECK(after[0] == before[0]);
  CHECK(after[1].bias_bytes == expected[1].bias_bytes);
  CHECK(after[1].weight_bytes == before[1].weight_bytes);
  CHECK(after[2] == before[2]);
  CHECK(after[3].weight_bytes == expected[3].weight_bytes);
  CHECK(after[3].bias_bytes == before[3].bias_bytes);
}

TEST_CASE("state dict: F16 and BF16 files load into float layers, rounded as the file says") {
  scratch_dir dir;
  transformer source = make_transformer(1, 4, 17);
  bitnet::save_state_dict(source, dir / "bf16.safetensors", {.dtype = st::dtype::BF16});
  CHECK(st::reader(dir / "bf16.safetensors").info("head.weight").type == st::dtype::BF16);
  transformer target = make_transformer(1, 4, 18);
  bitnet::load_state_dict(target, dir / "bf16.safetensors");
  // bfloat16 by hand: round the float's bits to the upper 16 bits, to nearest even.
  const auto to_bf16 = [](float v) {
    std::uint32_t bits = std::bit_cast<std::uint32_t>(v);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    return std::bit_cast<float>(bits);
  };
  const auto& want = std::get<Linear<float>>(source.head);
  const auto& got = std::get<Linear<float>>(target.head);
  for (Index r = 0; r < want.weight.rows(); ++r)
    for (Index c = 0; c < want.weight.cols(); ++c) CHECK(got.weight(r, c) == to_bf16(want.weight(r, c)));
  CHECK(got.weight != want.weight);  // the rounding happened

  // F16 holds these values (multiples of 1/64 below 2) exactly.
  std::mt19937 rng(19);
  Linear<float> exact(Matrix<float>(3, 5), Vector<float>(3));
  for (Index i = 0; i < exact.weight.size(); ++i) exact.weight.data()[i] = float(int(rng() % 128) - 64) / 64;
  for (Index i = 0; i < 3; ++i) (*exact.bias)(i) = float(i) / 64;
  bitnet::save_state_dict(exact, dir / "f16.safetensors", {.dtype = st::dtype::F16});
  CHECK(st::reader(dir / "f16.safetensors").info("weight").type == st::dtype::F16);
  Linear<float> loaded = random_linear<float>(5, 3, rng);
  bitnet::load_state_dict(loaded, dir / "f16.safetensors");
  CHECK(loaded.weight == exact.weight);
  CHECK(*loaded.bias == *exact.bias);

  CHECK_THROWS_AS(bitnet::save_state_dict(exact, dir / "x.safetensors", {.dtype = st::dtype::I8}), bitnet::value_error);
}

TEST_CASE("state dict: the graph is unchanged after a value error, a bad code or a malformed file") {
  scratch_dir dir;
  transformer graph = make_transformer(1, 4, 20);
  bitnet::replace_linear(graph);
  const auto before = snapshot(graph);
  const auto codes_before = ternary_of(graph);
  const auto unchanged = [&] {
    CHECK(snapshot(graph) == before);
    CHECK(ternary_of(graph) == codes_before);
  };
  bitnet::save_state_dict(graph, dir / "good.safetensors");

  SUBCASE("a NaN weight for a BitLinear, after other layers were staged") {
    const st::reader good(dir / "good.safetensors");
    std::vector<st::tensor_spec> specs;
    for (const auto& t : good.tensors()) specs.push_back({t.name, t.type, t.shape});
    st::writer out(dir / "nan.safetensors", specs);
    for (const auto& t : good.tensors()) {
      if (t.name != "head.weight") {
        out.copy_tensor(t.name, good, t.name);
        continue;
      }
      Matrix<float> w = good.read_matrix<float>(t.name);
      w(1, 2) = std::numeric_limits<float>::quiet_NaN();
      out.write(t.name, w);
    }
    out.finish();
    const std::string text = message_of([&] { bitnet::load_state_dict(graph, dir / "nan.safetensors"); });
    CHECK(text.find("\"head.weight\"") != std::string::npos);
    CHECK(text.find("non-finite value (nan)") != std::string::npos);
    unchanged();
  }
  SUBCASE("an F64 value beyond float's range") {
    const st::reader good(dir / "good.safetensors");
    std::vector<st::tensor_spec> specs;
    for (const auto& t : good.tensors()) specs.push_back({t.name, t.name == "blocks.0.attn.bias" ? st::dtype::F64 : t.type, t.shape});
    st::writer out(dir / "f64.safetensors", specs);
    for (const auto& t : good.tensors())
      if (t.name == "blocks.0.attn.bias")
        out.write(t.name, Vector<double>::Constant(4, 1e300).eval());
      else
        out.copy_tensor(t.name, good, t.name);
    out.finish();
    const std::string text = message_of([&] { bitnet::load_state_dict(graph, dir / "f64.safetensors"); });
    CHECK(text.find("\"blocks.0.attn.bias\"") != std::string::npos);
    unchanged();
  }
  SUBCASE("a packed weight holding the invalid code 3") {
    transformer packed_graph = make_transformer(1, 4, 21);
    bitnet::replace_linear(packed_graph);
    bitnet::save_state_dict(packed_graph, dir / "packed.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
    const st::reader good(dir / "packed.safetensors");
    std::vector<st::tensor_spec> specs;
    for (const auto& t : good.tensors()) specs.push_back({t.name, t.type, t.shape});
    st::writer out(dir / "code3.safetensors", specs, {good.metadata().begin(), good.metadata().end()});
    for (const auto& t : good.tensors()) {
      if (t.name != "blocks.0.mlp.down.weight") {
        out.copy_tensor(t.name, good, t.name);
        continue;
      }
      Matrix<std::uint8_t> w = good.read_matrix<std::uint8_t>(t.name);
      w(0, 3) = std::uint8_t(w(0, 3) | 3u);
      out.write(t.name, w);
    }
    out.finish();
    const std::string text = message_of([&] { bitnet::load_state_dict(graph, dir / "code3.safetensors"); });
    CHECK(text.find("\"blocks.0.mlp.down.weight\"") != std::string::npos);
    CHECK(text.find("code 3") != std::string::npos);
    unchanged();
  }
  SUBCASE("a truncated file") {
    fs::copy_file(dir / "good.safetensors", dir / "short.safetensors");
    fs::resize_file(dir / "short.safetensors", fs::file_size(dir / "good.safetensors") - 4);
    CHECK_THROWS_AS(bitnet::load_state_dict(graph, dir / "short.safetensors"), bitnet::io_error);
    unchanged();
  }
  SUBCASE("a missing file") {
    CHECK_THROWS_AS(bitnet::load_state_dict(graph, dir / "none.safetensors"), bitnet::io_error);
    unchanged();
  }
  SUBCASE("a packed checkpoint into plain Linear layers") {
    transformer plain = make_transformer(1, 4, 22);
    const auto plain_before = snapshot(plain);
    transformer packed_graph = make_transformer(1, 4, 23);
    bitnet::replace_linear(packed_graph);
    bitnet::save_state_dict(packed_graph, dir / "p.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
    const std::string text = message_of([&] { bitnet::load_state_dict(plain, dir / "p.safetensors"); });
    CHECK(text.find("\"head.weight_scale\": the file stores \"head\" in the packed BitNet form") != std::string::npos);
    CHECK(snapshot(plain) == plain_before);
  }
}

namespace copy_case {
struct copying_layer {
  Eigen::MatrixXf weight;  // column-major; a row-major view of it is a copy
};
inline bitnet::linear_view<float> bitnet_linear(const copying_layer& l) { return {l.weight, std::nullopt}; }
}  // namespace copy_case

TEST_CASE("state dict: a bitnet_linear view that copies the weights is reported, nothing is written") {
  scratch_dir dir;
  copy_case::copying_layer layer{Eigen::MatrixXf::Constant(2, 3, 1.5f)};
  bitnet::save_state_dict(layer, dir / "c.safetensors");  // saving through a copy is fine
  CHECK(st::reader(dir / "c.safetensors").read_matrix<float>("weight") == Matrix<float>::Constant(2, 3, 1.5f));
  const std::string text = message_of([&] { bitnet::load_state_dict(layer, dir / "c.safetensors"); });
  CHECK(text.find("returns a copy of its weight") != std::string::npos);
}

TEST_CASE("state dict: the Hugging Face packed form loads exactly the file's codes and scale") {
  scratch_dir dir;
  // A hand-made packed layer: out = 6 (ragged: 2 packed rows), in = 5.
  Matrix<std::int8_t> q(6, 5);
  q << 1, 0, -1, 1, 0,   //
      0, 0, 0, 1, -1,    //
      -1, -1, 1, 0, 1,   //
      1, 1, 1, 1, 1,     //
      0, -1, 0, 0, 0,    //
      -1, 0, 1, 0, -1;
  const Matrix<std::uint8_t> packed = hf::pack_weights(q);
  REQUIRE(packed.rows() == 2);
  for (const auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear}) {
    CAPTURE(hf::convention_name(convention));
    const float stored = convention == hf::scale_convention::bitlinear ? 2.5f : 0.4f;  // the same scale, 1/0.4
    {
      st::writer out(dir / "hf.safetensors", {{"model.proj.weight", st::dtype::U8, {2, 5}},
                                              {"model.proj.weight_scale", st::dtype::BF16, {1}},
                                              {"model.proj.bias", st::dtype::F32, {6}}});
      out.write("model.proj.weight", packed);
      const float scale[1] = {stored};
      out.write_values<float>("model.proj.weight_scale", scale);
      out.write("model.proj.bias", Vector<float>::LinSpaced(6, -1, 1).eval());
      out.finish();
    }
    const float stored_bf16 = st::reader(dir / "hf.safetensors").read_values<float>("model.proj.weight_scale")[0];
    std::mt19937 rng(24);
    std::map<std::string, BitLinear<float>> graph;
    graph.emplace("proj", BitLinear<float>(reference::random_matrix<float>(6, 5, rng), Vector<float>::Zero(6)));
    const auto report =
        bitnet::load_state_dict(graph, dir / "hf.safetensors", {.prefix = "model.", .scale_convention = convention});
    CHECK(report.loaded.size() == 3);
    const BitLinear<float>& layer = graph.at("proj");
    CHECK(layer.ternary_weight() == q);
    if (convention == hf::scale_convention::bitlinear) {
      CHECK(layer.weight_scale() == stored_bf16);
      CHECK(*layer.bias() == Vector<float>::LinSpaced(6, -1, 1));
    } else {
      CHECK(layer.weight_scale() == 1.0f / stored_bf16);
      CHECK(*layer.bias() == Vector<float>::LinSpaced(6, -1, 1) * stored_bf16);  // the file's bias is b / m
    }
    // The layer is the codes and the scale: it has no latent weights, and forward is exactly
    // (xq . q) / (sx * sw) + b, computed here from the naive reference quantizer.
    CHECK_FALSE(layer.has_latent_weights());
    CHECK_THROWS_WITH_AS((void)layer.weight(), doctest::Contains("built from ternary weights"), bitnet::state_error);
    const Matrix<float> x = reference::random_matrix<float>(2, 5, rng);
    const Matrix<float> y = layer.forward(x);
    for (Index b = 0; b < 2; ++b) {
      const float sx = reference::activation_scale(x, b);
      for (Index o = 0; o < 6; ++o) {
        std::int64_t acc = 0;
        for (Index k = 0; k < 5; ++k)
          acc += std::int64_t(reference::clamp(reference::round_half_even(x(b, k) * sx), -128.0f, 127.0f)) * q(o, k);
        CHECK(y(b, o) == float(double(acc) / (double(sx) * double(layer.weight_scale()))) + (*layer.bias())(o));
      }
    }
    fs::remove(dir / "hf.safetensors");
  }
}

TEST_CASE("state dict: BitLinear layers saved in the packed form load back to the same codes, both conventions") {
  scratch_dir dir;
  for (const auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear}) {
    CAPTURE(hf::convention_name(convention));
    transformer source = make_transformer(2, 9, 25);
    bitnet::replace_linear(source);
    const bitnet::state_dict_options options{.scale_convention = convention,
                                             .bit_linear = bitnet::bit_linear_storage::hf_packed};
    bitnet::save_state_dict(source, dir / "packed.safetensors", options);
    const st::reader file(dir / "packed.safetensors");
    CHECK(file.info("blocks.1.mlp.up.weight").type == st::dtype::U8);
    CHECK(file.info("blocks.1.mlp.up.weight").shape == std::vector<std::uint64_t>{5, 9});  // ceil(18/4) x 9
    const auto& up = std::get<BitLinear<float>>(source.blocks[1].mlp.up);
    CHECK(hf::unpack_weights(file.read_matrix<std::uint8_t>("blocks.1.mlp.up.weight"), 18) == up.ternary_weight());
    const float stored = file.read_values<float>("blocks.1.mlp.up.weight_scale")[0];
    CHECK(stored == (convention == hf::scale_convention::bitlinear ? up.weight_scale() : 1.0f / up.weight_scale()));

    transformer target = make_transformer(2, 9, 26);
    bitnet::replace_linear(target);
    bitnet::load_state_dict(target, file, options);
    CHECK(ternary_of(target) == ternary_of(source));
    // Same codes and scale: the layers compute the same outputs.
    std::mt19937 rng(27);
    const Matrix<float> x = reference::random_matrix<float>(3, 9, rng);
    const auto& got = std::get<BitLinear<float>>(target.blocks[1].mlp.up);
    if (convention == hf::scale_convention::bitlinear) {
      CHECK(got.forward(x) == up.forward(x));
    } else {
      // The bias is stored as b * sw and multiplied back by 1 / sw: equal up to that rounding.
      CHECK(got.forward(x).isApprox(up.forward(x), 1e-6f));
    }
  }
}

TEST_CASE("state dict: BitLinear layers without latent weights save packed, exactly, and refuse the latent form") {
  scratch_dir dir;
  for (const auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear}) {
    CAPTURE(hf::convention_name(convention));
    const bitnet::state_dict_options packed{.scale_convention = convention,
                                            .bit_linear = bitnet::bit_linear_storage::hf_packed};
    transformer source = make_transformer(2, 9, 28);
    bitnet::replace_linear(source);
    bitnet::save_state_dict(source, dir / "first.safetensors", packed);
    // Loaded from the packed form: codes and scales, no latent weights.
    transformer loaded = make_transformer(2, 9, 29);
    bitnet::replace_linear(loaded);
    bitnet::load_state_dict(loaded, dir / "first.safetensors", packed);
    for (slot* s : slots_of(loaded)) CHECK_FALSE(std::get<BitLinear<float>>(*s).has_latent_weights());

    // The latent form needs latent weights: a state_error naming the first such layer, no file written.
    bitnet::state_dict_options latent = packed;
    latent.bit_linear = bitnet::bit_linear_storage::latent;
    CHECK_THROWS_WITH_AS(bitnet::save_state_dict(loaded, dir / "latent.safetensors", latent),
                         doctest::Contains("the BitLinear at \"blocks.0.attn\" has no latent weights"), bitnet::state_error);
    CHECK_FALSE(fs::exists(dir / "latent.safetensors"));

    // The packed form works, and loads back to the same codes, the same scale bits and the same outputs.
    bitnet::save_state_dict(loaded, dir / "second.safetensors", packed);
    transformer reloaded = make_transformer(2, 9, 30);
    bitnet::replace_linear(reloaded);
    bitnet::load_state_dict(reloaded, dir / "second.safetensors", packed);
    if (convention == hf::scale_convention::bitlinear)  // autobitlinear rounds the bias (below)
      CHECK(values_of(snapshot(reloaded)) == values_of(snapshot(loaded)));
    CHECK(ternary_of(reloaded) == ternary_of(loaded));
    CHECK(ternary_of(reloaded) == ternary_of(source));
    std::mt19937 rng(31);
    const std::vector<slot*> before = slots_of(loaded), after = slots_of(reloaded);
    for (std::size_t i = 0; i < before.size(); ++i) {
      const auto& was = std::get<BitLinear<float>>(*before[i]);
      const auto& now = std::get<BitLinear<float>>(*after[i]);
      CAPTURE(i);
      CHECK(std::bit_cast<std::uint32_t>(now.weight_scale()) == std::bit_cast<std::uint32_t>(was.weight_scale()));
      const Matrix<float> x = reference::random_matrix<float>(3, now.in_features(), rng);
      // bitlinear stores the bias as it is; autobitlinear as b * sw, multiplied back by m on load.
      if (convention == hf::scale_convention::bitlinear || !now.bias())
        CHECK(now.forward(x) == was.forward(x));
      else
        CHECK(now.forward(x).isApprox(was.forward(x), 1e-6f));
    }
  }
}

TEST_CASE("state dict: a bias-only latent file keeps a BitLinear's ternary weights (non-strict)") {
  scratch_dir dir;
  Matrix<std::int8_t> q(3, 4);
  q << 1, 0, -1, 1,  //
      0, -1, 1, 1,   //
      -1, 0, 0, 1;
  std::map<std::string, BitLinear<float>> graph;
  graph.emplace("fc", BitLinear<float>::from_ternary(q, 3.0f, Vector<float>::Zero(3)));
  {
    st::writer out(dir / "bias.safetensors", {{"fc.bias", st::dtype::F32, {3}}});
    out.write("fc.bias", Vector<float>::LinSpaced(3, 1, 3).eval());
    out.finish();
  }
  const auto report = bitnet::load_state_dict(graph, dir / "bias.safetensors", {.strict = false});
  CHECK(report.missing == std::vector<std::string>{"fc.weight"});
  const BitLinear<float>& layer = graph.at("fc");
  CHECK(*layer.bias() == Vector<float>::LinSpaced(3, 1, 3));
  CHECK(layer.ternary_weight() == q);
  CHECK(layer.weight_scale() == 3.0f);
  CHECK_FALSE(layer.has_latent_weights());
}

TEST_CASE("state dict: a released BitLinear cannot be saved in the latent form; the error names it") {
  scratch_dir dir;
  std::map<std::string, BitLinear<float>> graph;
  std::mt19937 rng(32);
  graph.emplace("kept", BitLinear<float>(reference::random_matrix<float>(4, 3, rng)));
  graph.emplace("lean", BitLinear<float>(reference::random_matrix<float>(4, 3, rng)));
  graph.at("lean").release_latent_weights();
  CHECK_THROWS_WITH_AS(bitnet::save_state_dict(graph, dir / "m.safetensors"),
                       doctest::Contains("save_state_dict: the BitLinear at \"lean\" has no latent weights"),
                       bitnet::state_error);
  CHECK_FALSE(fs::exists(dir / "m.safetensors"));
  bitnet::save_state_dict(graph, dir / "m.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
  CHECK(st::reader(dir / "m.safetensors").contains("lean.weight_scale"));
}

TEST_CASE("state dict: the scale convention is read from the file, never assumed") {
  scratch_dir dir;
  transformer source = make_transformer(1, 8, 41);
  bitnet::replace_linear(source);
  // Written in the bitlinear convention: the file's __metadata__ says so.
  bitnet::save_state_dict(source, dir / "bitlinear.safetensors",
                          {.scale_convention = hf::scale_convention::bitlinear,
                           .bit_linear = bitnet::bit_linear_storage::hf_packed});
  const st::reader file(dir / "bitlinear.safetensors");
  const hf::quantization_config declared = hf::parse_quantization_config(file.metadata().at("quantization_config"), "m");
  CHECK(declared.quant_method == "bitnet");
  CHECK(declared.linear_class == hf::scale_convention::bitlinear);
  CHECK(declared.mode == hf::quantization_mode::offline);

  // The default reads it: the loaded scales are the source's, not 1 / them (the reported bug: a
  // bitlinear file read as autobitlinear gave outputs ~150x too large, silently).
  transformer target = make_transformer(1, 8, 42);
  bitnet::replace_linear(target);
  bitnet::load_state_dict(target, file);
  CHECK(ternary_of(target) == ternary_of(source));
  std::mt19937 rng(43);
  const Matrix<float> x = reference::random_matrix<float>(2, 8, rng);
  const auto& up = std::get<BitLinear<float>>(source.blocks[0].mlp.up);
  CHECK(std::get<BitLinear<float>>(target.blocks[0].mlp.up).forward(x) == up.forward(x));

  // An explicit choice that contradicts the file is an error naming both; the graph is unchanged.
  transformer other = make_transformer(1, 8, 44);
  bitnet::replace_linear(other);
  const auto before = snapshot(other);
  const std::string text = message_of(
      [&] { bitnet::load_state_dict(other, file, {.scale_convention = hf::scale_convention::autobitlinear}); });
  CHECK(text.find("declares linear_class \"bitlinear\"") != std::string::npos);
  CHECK(text.find("asked for the scale convention \"autobitlinear\"") != std::string::npos);
  CHECK(snapshot(other) == before);
  // The agreeing explicit choice loads.
  bitnet::load_state_dict(other, file, {.scale_convention = hf::scale_convention::bitlinear});
  CHECK(ternary_of(other) == ternary_of(source));

  // The same tensors without the declaration: an error unless the caller says which convention.
  {
    std::vector<st::tensor_spec> specs;
    for (const auto& t : file.tensors()) specs.push_back({t.name, t.type, t.shape});
    st::writer out(dir / "undeclared.safetensors", specs, {{"format", "pt"}});
    for (const auto& t : file.tensors()) out.copy_tensor(t.name, file, t.name);
    out.finish();
  }
  transformer fresh = make_transformer(1, 8, 45);
  bitnet::replace_linear(fresh);
  const auto fresh_before = snapshot(fresh);
  const std::string missing = message_of([&] { bitnet::load_state_dict(fresh, dir / "undeclared.safetensors"); });
  CHECK(missing.find("declares no scale convention") != std::string::npos);
  CHECK(missing.find("bitnet never guesses it") != std::string::npos);
  CHECK(snapshot(fresh) == fresh_before);
  bitnet::load_state_dict(fresh, dir / "undeclared.safetensors", {.scale_convention = hf::scale_convention::bitlinear});
  CHECK(ternary_of(fresh) == ternary_of(source));
  // hf::load_bit_linear follows the same rule.
  const st::reader undeclared(dir / "undeclared.safetensors");
  CHECK_THROWS_AS(hf::load_bit_linear<float>(undeclared, "blocks.0.mlp.up"), bitnet::io_error);
  CHECK(hf::load_bit_linear<float>(file, "blocks.0.mlp.up").weight_scale() == up.weight_scale());
  CHECK_THROWS_WITH_AS(hf::load_bit_linear<float>(file, "blocks.0.mlp.up", 0, hf::scale_convention::autobitlinear),
                       doctest::Contains("declares linear_class \"bitlinear\""), bitnet::io_error);
  // A latent-only file needs no declaration.
  bitnet::save_state_dict(source, dir / "latent.safetensors");
  CHECK_FALSE(st::reader(dir / "latent.safetensors").metadata().contains("quantization_config"));
  bitnet::load_state_dict(fresh, dir / "latent.safetensors");
}

TEST_CASE("state dict: quantization_config blocks are parsed strictly and resolved without defaults") {
  const hf::quantization_config full = hf::parse_quantization_config(
      R"({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online",
          "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.up_proj"], "use_rms_norm": true,
          "rms_norm_eps": 1e-05, "bitnet_out_features": {"a.b": 7}, "future_key": {"x": [1, 2]}})",
      "cfg");
  CHECK(full.linear_class == hf::scale_convention::autobitlinear);
  CHECK(full.mode == hf::quantization_mode::online);
  CHECK(full.modules_to_not_convert == std::vector<std::string>{"lm_head", "model.layers.0.mlp.up_proj"});
  CHECK(full.use_rms_norm);
  CHECK(full.rms_norm_eps == 1e-5);
  CHECK(full.out_features.at("a.b") == 7);
  // to_json and parse are inverse.
  const hf::quantization_config again = hf::parse_quantization_config(hf::to_json(full), "again");
  CHECK(hf::to_json(again) == hf::to_json(full));

  const hf::quantization_config bare = hf::parse_quantization_config(R"({"quant_method": "bitnet"})", "cfg");
  CHECK_FALSE(bare.linear_class.has_value());
  CHECK_THROWS_WITH_AS(hf::resolve_scale_convention(bare, "cfg", std::nullopt),
                       doctest::Contains("transformers would read it as \"bitlinear\""), bitnet::io_error);
  CHECK(hf::resolve_scale_convention(bare, "cfg", hf::scale_convention::bitlinear) == hf::scale_convention::bitlinear);
  CHECK_THROWS_WITH_AS(hf::resolve_scale_convention(std::nullopt, "f.safetensors", std::nullopt),
                       doctest::Contains("f.safetensors declares no scale convention"), bitnet::io_error);
  const hf::quantization_config fp8 = hf::parse_quantization_config(R"({"quant_method": "fp8"})", "cfg");
  CHECK_THROWS_WITH_AS(hf::resolve_scale_convention(fp8, "cfg", hf::scale_convention::bitlinear),
                       doctest::Contains("quant_method \"fp8\""), bitnet::io_error);

  CHECK_THROWS_WITH_AS(hf::parse_quantization_config(R"({"linear_class": "BitLinear"})", "cfg"),
                       doctest::Contains("cfg: quantization_config.linear_class must be"), bitnet::io_error);
  CHECK_THROWS_WITH_AS(hf::parse_quantization_config(R"({"modules_to_not_convert": [1]})", "cfg"),
                       doctest::Contains("modules_to_not_convert must be null or a list of strings"), bitnet::io_error);
  CHECK_THROWS_WITH_AS(hf::parse_quantization_config(R"([1])", "cfg"), doctest::Contains("not an object"),
                       bitnet::io_error);
  CHECK_THROWS_WITH_AS(hf::parse_quantization_config(R"({"quant_method": )", "cfg"),
                       doctest::Contains("cfg: invalid JSON"), bitnet::io_error);
  CHECK(hf::config_json_quantization(R"({"hidden_size": 8, "quantization_config": null})", "c") == std::nullopt);
  CHECK(hf::config_json_quantization(R"({"hidden_size": 8})", "c") == std::nullopt);
  CHECK(hf::config_json_quantization(R"({"a": {"quantization_config": {"linear_class": "bitlinear"}},
                                         "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear"}})",
                                     "c")
            ->linear_class == hf::scale_convention::bitlinear);
}

namespace map_hook {
// A norm that keeps its weight in a std::vector and names it through an Eigen::Map built inside the
// hook (docs/customization.md allows a Map): the Map is gone when the hook returns.
struct vector_norm {
  std::vector<float> gain;
};
template <class Visit>
void bitnet_parameters(vector_norm& n, Visit& visit) {
  Eigen::Map<bitnet::Vector<float>> view(n.gain.data(), bitnet::Index(n.gain.size()));
  visit("weight", view);
}
struct model {
  vector_norm norm;
  std::vector<float> table_storage;
  bitnet::Matrix<float> dense{2, 2};
};
template <class Visit>
void bitnet_parameters(model& m, Visit& visit) {
  Eigen::Map<bitnet::Matrix<float>> table(m.table_storage.data(), 2, 3);
  visit("table", table);
}
BITNET_LAYERS(model, norm, dense);
}  // namespace map_hook

TEST_CASE("state dict: a bitnet_parameters hook may pass an Eigen::Map it built for the call") {
  scratch_dir dir;
  map_hook::model source{{{1.5f, -2.0f, 0.25f}}, {1, 2, 3, 4, 5, 6}, bitnet::Matrix<float>{{7, 8}, {9, 10}}};
  bitnet::save_state_dict(source, dir / "m.safetensors");
  // Loading writes through the hook's Maps after the hooks returned (the load stages everything
  // first): the values must land in the vectors, and nothing may touch freed stack memory (ASan).
  map_hook::model target{{{0, 0, 0}}, std::vector<float>(6, 0.0f), bitnet::Matrix<float>::Zero(2, 2)};
  const float* gain_data = target.norm.gain.data();
  bitnet::load_state_dict(target, dir / "m.safetensors", {.strict = true});
  CHECK(target.norm.gain == source.norm.gain);
  CHECK(target.norm.gain.data() == gain_data);  // written in place, not reallocated
  CHECK(target.table_storage == source.table_storage);
  CHECK(target.dense == source.dense);
  // A Map of the wrong shape is refused by name, and nothing is written.
  map_hook::model wrong{{{9, 9}}, std::vector<float>(6, 0.0f), bitnet::Matrix<float>::Zero(2, 2)};
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(wrong, dir / "m.safetensors"), doctest::Contains("norm.weight"),
                       bitnet::error);
  CHECK(wrong.norm.gain == std::vector<float>{9, 9});
  CHECK(wrong.table_storage == std::vector<float>(6, 0.0f));
}

// ---- Ternary Bonsai-style folders: exact import, declared rotations, packed unit layers ------------

namespace bonsai_case {
using proj = std::optional<BitLinear<float>>;
struct folder_block {
  proj up, down;
  Vector<float> norm;
};
BITNET_LAYERS(folder_block, up, down, norm);
struct dense_block {
  Linear<float> up;
};
BITNET_LAYERS(dense_block, up);

constexpr Index group = 64;

// Ternary per group of 64 inputs; every d has 7 significant bits, so BF16 holds the weights exactly.
Matrix<float> ternary(Index out, Index in, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> code(-1, 1), mantissa(64, 127);
  Matrix<float> w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index first = 0; first < in; first += group) {
      const float d = std::ldexp(float(mantissa(rng)), -12);
      for (Index c = first; c < std::min(first + group, in); ++c) w(r, c) = float(code(rng)) * d;
    }
  return w;
}

// A folder with BF16 "up.weight" (6 x 128), "down.weight" (5 x 160, a ragged last group), "norm",
// and, when `packing` is not empty, that text as hadamard_packing.json.
void write_folder(const fs::path& folder, const Matrix<float>& up, const Matrix<float>& down, const std::string& packing) {
  fs::create_directories(folder);
  st::writer out(folder / "model.safetensors",
                 {{"up.weight", st::dtype::BF16, {6, 128}}, {"down.weight", st::dtype::BF16, {5, 160}},
                  {"norm", st::dtype::BF16, {128}}},
                 {{"format", "pt"}});
  out.write("up.weight", up);
  out.write("down.weight", down);
  out.write("norm", Vector<float>::Ones(128));
  out.finish();
  std::ofstream(folder / "config.json") << R"({"model_type": "qwen3"})";
  if (!packing.empty()) std::ofstream(folder / "hadamard_packing.json") << packing;
}

std::string packing_json(const std::vector<std::int8_t>& signs128, const std::string& transform = "normalized-signed-sylvester-walsh-hadamard",
                         const std::string& role = "fold-before-matmul") {
  std::string text = R"({"schema_version": 2, "kind": "hadamard-weight-fold", "status": "requires-matching-runtime", )"
                     R"("transform": {"name": ")" + transform + R"(", "block_size": 32, "sign_mode": "explicit"}, "signs": {"128": [)";
  for (std::size_t k = 0; k < signs128.size(); ++k) text += (k ? ", " : "") + std::to_string(int(signs128[k]));
  return text + R"(]}, "tensors": [{"name": "up.weight", "axis": -1, "role": ")" + role + R"("}]})";
}

bitnet::state_dict_options exact_options() {
  bitnet::state_dict_options options;
  options.new_layers.weight_scales = bitnet::weight_scaling::per_group;
  options.new_layers.group_size = group;
  options.weights = bitnet::ternary_import::exact;
  return options;
}

// Every file under `root` with its bytes: what a refusal must leave as it was.
std::map<std::string, std::string> tree_of(const fs::path& root) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    if (entry.is_directory()) {
      files[entry.path().string()] = "/";
      continue;
    }
    std::ifstream in(entry.path(), std::ios::binary);
    files[entry.path().string()] = std::string(std::istreambuf_iterator<char>(in), {});
  }
  return files;
}
}  // namespace bonsai_case

TEST_CASE("state dict: an unpacked folder imports exactly per group, with the rotation hadamard_packing.json declares") {
  using namespace bonsai_case;
  scratch_dir dir;
  const Matrix<float> up = ternary(6, 128, 1), down = ternary(5, 160, 2);
  const auto rotation = bitnet::hadamard_rotation::random_signs(128, 32, 9);
  write_folder(dir / "folder", up, down, packing_json(rotation.signs()));
  folder_block model;
  const bitnet::state_dict_report report = bitnet::load_state_dict(model, dir / "folder", exact_options());
  CHECK(report.loaded.size() == 3);
  REQUIRE(model.up);
  REQUIRE(model.down);
  CHECK(model.up->dequantized_weight() == up);  // codes x d == the BF16 weights, bit for bit
  CHECK(model.down->dequantized_weight() == down);
  CHECK(model.down->unit_scales().cols() == 3);  // 64 + 64 + 32
  CHECK_FALSE(model.up->has_latent_weights());   // imported, not quantized
  REQUIRE(model.up->options().rotation);
  CHECK(*model.up->options().rotation == rotation);  // declared for up.weight only
  CHECK_FALSE(model.down->options().rotation);
  // The layer computes W (R x): against the same weights applied to the rotated input in double.
  Matrix<float> x(2, 128);
  for (Index c = 0; c < 128; ++c) x(0, c) = float(c % 7) - 3.0f, x(1, c) = float(c % 5) * 0.5f;
  const Matrix<float> rx = rotation.apply(x), y = model.up->forward(x);
  for (Index b = 0; b < 2; ++b)
    for (Index o = 0; o < 6; ++o) {
      const double absmax = double(rx.row(b).cwiseAbs().maxCoeff());
      double exact = 0, weights = 0;
      for (Index c = 0; c < 128; ++c) exact += double(up(o, c)) * double(rx(b, c)), weights += std::fabs(double(up(o, c)));
      CHECK(std::fabs(double(y(b, o)) - exact) <= absmax / 254.0 * weights * (1 + 1e-5) + 1e-6);
    }
  // Without the exact import the same folder is quantized (absmean per group): other scales.
  folder_block quantized;
  bitnet::state_dict_options quantize = exact_options();
  quantize.weights = bitnet::ternary_import::quantize;
  bitnet::load_state_dict(quantized, dir / "folder", quantize);
  CHECK(quantized.up->dequantized_weight() != up);
  CHECK(quantized.up->options().rotation == model.up->options().rotation);
}

TEST_CASE("state dict: fine-tuned latent weights reload into an imported (frozen) layer with its scales") {
  using namespace bonsai_case;
  scratch_dir dir;
  const Matrix<float> up = ternary(6, 128, 1), down = ternary(5, 160, 2);
  write_folder(dir / "folder", up, down, "");
  folder_block tuned;
  bitnet::load_state_dict(tuned, dir / "folder", exact_options());
  REQUIRE(tuned.up);
  REQUIRE(tuned.up->options().scale_update == bitnet::weight_scale_update::frozen);
  const Matrix<float> imported_scales = tuned.up->unit_scales();
  // A fine-tuning step's worth of change: every weight moved, some across a code boundary.
  Matrix<float> latent = tuned.up->dequantized_weight();
  for (Index r = 0; r < latent.rows(); ++r)
    for (Index c = 0; c < latent.cols(); ++c) latent(r, c) += imported_scales(r, c / group) * (float((r * 7 + c) % 9) - 4.0f) / 6.0f;
  tuned.up->set_weight(latent);
  tuned.down->set_weight(tuned.down->dequantized_weight());
  CHECK(tuned.up->unit_scales() == imported_scales);
  CHECK(tuned.up->dequantized_weight() != up);  // some codes moved
  bitnet::save_state_dict(tuned, dir / "tuned.safetensors");
  // Reload: import the folder again, then the tuned latent weights into the same (frozen) slots.
  folder_block reloaded;
  bitnet::load_state_dict(reloaded, dir / "folder", exact_options());
  bitnet::load_state_dict(reloaded, dir / "tuned.safetensors");
  REQUIRE(reloaded.up);
  CHECK(reloaded.up->unit_scales() == imported_scales);  // not the absmean of the latent weights
  CHECK(reloaded.up->weight() == tuned.up->weight());
  CHECK(reloaded.up->dequantized_weight() == tuned.up->dequantized_weight());
  Matrix<float> x(2, 128);
  for (Index c = 0; c < 128; ++c) x(0, c) = float(c % 7) - 3.0f, x(1, c) = float(c % 5) * 0.5f;
  CHECK(reloaded.up->forward(x) == tuned.up->forward(x));
  // Into empty slots the same file is quantized with absmean, as any latent checkpoint.
  folder_block fresh;
  bitnet::state_dict_options per_group;
  per_group.new_layers = exact_options().new_layers;
  bitnet::load_state_dict(fresh, dir / "tuned.safetensors", per_group);
  REQUIRE(fresh.up);
  CHECK(fresh.up->unit_scales() != imported_scales);
}

TEST_CASE("state dict: refusals of an unpacked folder name what and where, and change nothing") {
  using namespace bonsai_case;
  scratch_dir dir;
  Matrix<float> up = ternary(6, 128, 1);
  const Matrix<float> down = ternary(5, 160, 2);
  const auto signs = bitnet::hadamard_rotation::random_signs(128, 32, 9).signs();
  // A weight that breaks its group: row 4, group 1 (columns 64 to 127).
  Matrix<float> broken = up;
  broken(4, 70) = broken(4, 70) == 0 ? 0.5f : broken(4, 70) * 2;
  write_folder(dir / "broken", broken, down, "");
  const auto before = tree_of(dir.path);
  folder_block model;
  model.norm = Vector<float>::Constant(128, 3.0f);
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(model, dir / "broken", exact_options()),
                       doctest::Contains("\"up.weight\": exact import of up: the weights are not ternary at row 4, group 1 (columns 64 "
                                         "to 127)"),
                       bitnet::io_error);
  CHECK_FALSE(model.up);
  CHECK_FALSE(model.down);
  CHECK(model.norm == Vector<float>::Constant(128, 3.0f));
  CHECK(tree_of(dir.path) == before);
  // An exact import needs unit scales: per_tensor would store 1 / d.
  write_folder(dir / "plain", up, down, "");
  bitnet::state_dict_options per_tensor = exact_options();
  per_tensor.new_layers = {};
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(model, dir / "plain", per_tensor),
                       doctest::Contains("an exact import needs options.weight_scales per_row or per_group"),
                       bitnet::io_error);
  CHECK_FALSE(model.up);
  // A rotation the folder declares but bitnet cannot interpret, or cannot apply, is refused by name.
  write_folder(dir / "transform", up, down, packing_json(signs, "random-orthogonal"));
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(model, dir / "transform", exact_options()),
                       doctest::Contains("hadamard_packing.json: transform.name must be "
                                         "\"normalized-signed-sylvester-walsh-hadamard\", got \"random-orthogonal\""),
                       bitnet::io_error);
  write_folder(dir / "role", up, down, packing_json(signs, "normalized-signed-sylvester-walsh-hadamard",
                                                  "fold-before-matmul\"}, {\"name\": \"norm\", \"axis\": -1, \"role\": "
                                                  "\"inverse-after-lookup"));
  const std::string role_message =
      "\"norm\": " + (dir / "role" / "hadamard_packing.json").string() + " declares it stored rotated (inverse-after-lookup)";
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(model, dir / "role", exact_options()),
                       doctest::Contains(role_message.c_str()),
                       bitnet::io_error);
  std::vector<std::int8_t> short_signs(signs.begin(), signs.begin() + 64);
  std::string wrong_width = packing_json(short_signs);
  wrong_width.replace(wrong_width.find("\"128\""), 5, "\"64\"");
  write_folder(dir / "width", up, down, wrong_width);
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(model, dir / "width", exact_options()),
                       doctest::Contains("tensor \"up.weight\" (128 inputs): signs has no vector of width 128"),
                       bitnet::io_error);
  CHECK_FALSE(model.up);
  CHECK(model.norm == Vector<float>::Constant(128, 3.0f));
  // A folded weight cannot go into a plain linear layer, which does not rotate its input.
  write_folder(dir / "folded", up, down, packing_json(signs));
  dense_block dense{Linear<float>(128, 6, false)};
  const Matrix<float> kept = dense.up.weight;
  CHECK_THROWS_WITH_AS(bitnet::load_state_dict(dense, dir / "folded", {.strict = false}),
                       doctest::Contains("declares it stored rotated (fold-before-matmul), but the graph holds a plain "
                                         "linear layer"),
                       bitnet::io_error);
  CHECK(dense.up.weight == kept);
}

TEST_CASE("state dict: group-scaled, rotated layers save packed and reload with the same codes, scales and outputs") {
  using namespace bonsai_case;
  scratch_dir dir;
  const auto rotation = bitnet::hadamard_rotation::random_signs(128, 32, 9);
  write_folder(dir / "folder", ternary(6, 128, 1), ternary(5, 160, 2), packing_json(rotation.signs()));
  folder_block model;
  bitnet::load_state_dict(model, dir / "folder", exact_options());
  bitnet::save_state_dict(model, dir / "packed.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed});
  const st::reader file(dir / "packed.safetensors");
  const hf::quantization_config declared = *hf::declared_quantization(file);
  CHECK(declared.weight_scales == bitnet::weight_scaling::per_group);
  CHECK(declared.group_size == group);
  CHECK(declared.linear_class == hf::scale_convention::autobitlinear);
  REQUIRE(declared.rotation);
  CHECK(declared.rotation->block_size == 32);
  CHECK(declared.rotation->layers == std::vector<std::string>{"up"});
  CHECK(declared.out_features.at("down") == 5);
  CHECK(file.info("down.weight_scale").shape == std::vector<std::uint64_t>{5, 3});
  CHECK(file.read_values<std::int8_t>("up.rotation_signs") == rotation.signs());
  folder_block back;
  bitnet::load_state_dict(back, dir / "packed.safetensors");  // strict: every tensor has its place
  for (const auto& [saved, loaded] : {std::pair{&model.up, &back.up}, std::pair{&model.down, &back.down}}) {
    CHECK((*loaded)->ternary_weight() == (*saved)->ternary_weight());
    CHECK((*loaded)->unit_scales() == (*saved)->unit_scales());
    CHECK((*loaded)->options().rotation == (*saved)->options().rotation);
    Matrix<float> x = Matrix<float>::Ones(2, (*saved)->in_features());
    x(1, 0) = -4.0f;
    CHECK((*loaded)->forward(x) == (*saved)->forward(x));
  }
  // Into a layer that exists, the file's declaration decides its granularity and rotation.
  folder_block existing;
  existing.up.emplace(Matrix<float>::Ones(6, 128));
  existing.down.emplace(Matrix<float>::Ones(5, 160));
  bitnet::load_state_dict(existing, dir / "packed.safetensors");
  CHECK(existing.up->options().group_size == group);
  CHECK(existing.up->options().rotation == model.up->options().rotation);
  CHECK(existing.up->unit_scales() == model.up->unit_scales());
  // Refusals before anything is written: the bitlinear convention, and layers of two granularities.
  CHECK_THROWS_WITH_AS(bitnet::save_state_dict(model, dir / "bitlinear.safetensors",
                                               {.scale_convention = hf::scale_convention::bitlinear,
                                                .bit_linear = bitnet::bit_linear_storage::hf_packed}),
                       doctest::Contains("has one scale per group: its unit scales d are stored as magnitudes"),
                       bitnet::state_error);
  folder_block mixed = model;
  mixed.down.emplace(Matrix<float>::Ones(5, 160));  // per tensor
  CHECK_THROWS_WITH_AS(
      bitnet::save_state_dict(mixed, dir / "mixed.safetensors", {.bit_linear = bitnet::bit_linear_storage::hf_packed}),
      doctest::Contains("the BitLinear at \"down\" cannot share the file's declaration"), bitnet::state_error);
  CHECK_FALSE(fs::exists(dir / "bitlinear.safetensors"));
  CHECK_FALSE(fs::exists(dir / "mixed.safetensors"));
}
