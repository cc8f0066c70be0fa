// load_state_dict under allocation failure: the n-th allocation throws std::bad_alloc, for every n
// from 1 until a load succeeds (walking the graph, checking keys, reading and converting tensors,
// building the BitLinear layers), and after each failure the graph must be bit-identical. Its own
// executable because it replaces the global operator new (alloc_fault.hpp).
//
// The file is opened before the failures start: nlohmann/json 3.11's ~basic_json allocates (it
// flattens nested values onto a heap stack), so a failure injected there terminates the program
// whatever the caller does.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "alloc_fault.hpp"  // first: it configures Eigen

#include <filesystem>
#include <new>
#include <random>
#include <string>

#include <doctest/doctest.h>

#include <bitnet/replace.hpp>
#include <bitnet/state_dict.hpp>

#include "graph_fixtures.hpp"

using namespace fixtures;
namespace fs = std::filesystem;

namespace {

fs::path scratch_file(const std::string& name) {
  std::random_device rd;
  return fs::temp_directory_path() / ("bitnet_state_dict_alloc_" + std::to_string(rd()) + "_" + name);
}

// Loads `path` into fresh graphs from make(), failing allocation 1, 2, ... until a load succeeds.
template <class Make>
long fail_every_allocation(Make make, const fs::path& path, const bitnet::state_dict_options& options) {
  const bitnet::safetensors::reader file(path);
  const auto load = [&](auto& graph) { bitnet::load_state_dict(graph, file, options); };
  return alloc_fault::fail_every_allocation(make, load, [](auto& graph) { return snapshot(graph); });
}

}  // namespace

TEST_CASE("load_state_dict: every allocation failure leaves the graph bit-identical") {
  const fs::path file = scratch_file("t.safetensors");
  for (const bool converted : {false, true}) {
    CAPTURE(converted);
    const auto make = [converted] {
      auto graph = std::make_unique<transformer>(make_transformer(1, 5, 31));
      if (converted) bitnet::replace_linear(*graph);
      return graph;
    };
    {
      auto source = std::make_unique<transformer>(make_transformer(1, 5, 32));
      if (converted) bitnet::replace_linear(*source);
      bitnet::save_state_dict(*source, file);
    }
    MESSAGE("allocation points: ", fail_every_allocation(make, file, {}));
  }
  fs::remove(file);
}

TEST_CASE("load_state_dict: every allocation failure leaves a module tree bit-identical (packed form)") {
  const fs::path file = scratch_file("tree.safetensors");
  const bitnet::state_dict_options options{.bit_linear = bitnet::bit_linear_storage::hf_packed};
  const auto make = [] {
    auto tree = make_module_tree(33);
    bitnet::replace_linear(*tree);
    return tree;
  };
  auto converted = make_module_tree(35);
  bitnet::replace_linear(*converted);
  bitnet::save_state_dict(*converted, file, options);
  MESSAGE("allocation points: ", fail_every_allocation(make, file, options));
  fs::remove(file);
}
