// bitnet/torch.hpp with real libtorch: the BitLinear module (kernel path bit for bit, re-packing on
// the version counter, straight-through gradients against PyTorch's vectors and bitnet::backward)
// and replace_linear over module trees (every container kind, every policy, rollback at every layer,
// aliasing, unchanged parameter names), and whole trees in safetensors files and model folders
// (torch_state_dict.hpp). One translation unit: each libtorch TU costs ~30 s to build.
#include <bitnet/torch.hpp>
#include <bitnet/training.hpp>
#if BITNET_TEST_TORCH_STATE_DICT
#include <bitnet/convert.hpp>
#include <bitnet/torch_state_dict.hpp>

#include <filesystem>
#include <random>
#endif

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <new>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "training_reference.hpp"

namespace nn = torch::nn;
using bitnet::Index;
using bitnet::Matrix;
using bitnet::Vector;
using bitnet::libtorch::BitLinear;
using bitnet::libtorch::BitLinearImpl;

namespace {

template <class T>
torch::Dtype dtype_of() {
  return std::is_same_v<T, float> ? torch::kFloat : torch::kDouble;
}

template <class T>
Matrix<T> to_matrix(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().contiguous().view({-1, t.size(-1)});
  return Eigen::Map<const Matrix<T>>(c.data_ptr<T>(), c.size(0), c.size(1));
}

template <class T>
torch::Tensor to_tensor(const Matrix<T>& m) {
  return torch::from_blob(const_cast<T*>(m.data()), {m.rows(), m.cols()}, dtype_of<T>()).clone();
}

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor ca = a.detach().contiguous(), cb = b.detach().contiguous();
  return ca.sizes() == cb.sizes() && ca.scalar_type() == cb.scalar_type() &&
         std::memcmp(ca.data_ptr(), cb.data_ptr(), std::size_t(ca.numel()) * ca.element_size()) == 0;
}

// ---- the module -----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("torch BitLinear: the eval forward under no_grad is bitnet::BitLinear::forward bit for bit", T, float,
                   double) {
  torch::manual_seed(1);
  for (const bool rms : {false, true}) {
    CAPTURE(rms);
    const bitnet::bitlinear_options options{.rms_norm = rms};
    const torch::Tensor w = torch::randn({37, 70}, dtype_of<T>()) * 0.2;
    const torch::Tensor b = torch::randn({37}, dtype_of<T>());
    BitLinear layer(w.clone(), b.clone(), options);
    layer->eval();
    const torch::Tensor x = torch::randn({2, 3, 70}, dtype_of<T>()) * 3;
    const bitnet::BitLinear<T> reference(to_matrix<T>(w), Vector<T>(to_matrix<T>(b.view({1, -1})).transpose()), options);
    const Matrix<T> expected = reference.forward(to_matrix<T>(x));
    torch::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = layer->forward(x);
    }
    CHECK((y.sizes() == torch::IntArrayRef({2, 3, 37})));
    CHECK(same_bits(y.view({6, 37}), to_tensor<T>(expected)));
    {
      torch::InferenceMode inference;
      CHECK(same_bits(layer->forward(x).view({6, 37}), to_tensor<T>(expected)));
      // A non-contiguous input (a transposed view) gives the same rows.
      const torch::Tensor xt = x.view({6, 70}).t().contiguous().t();
      CHECK(!xt.is_contiguous());
      CHECK(same_bits(layer->forward(xt), to_tensor<T>(expected)));
      CHECK((layer->forward(torch::empty({0, 70}, dtype_of<T>())).sizes() == torch::IntArrayRef({0, 37})));
    }
    CHECK(layer->pack_count() == 1);  // packed once, at the first eval forward
  }
}

TEST_CASE("torch BitLinear: registers weight and bias as torch::nn::Linear does, and rejects what it cannot run") {
  BitLinear layer(5, 3);
  const auto names = layer->named_parameters().keys();
  CHECK((names == std::vector<std::string>{"weight", "bias"}));
  CHECK((layer->weight.sizes() == torch::IntArrayRef({3, 5})));
  CHECK(layer->weight.requires_grad());
  BitLinear no_bias(5, 3, false);
  CHECK((no_bias->named_parameters().keys() == std::vector<std::string>{"weight"}));
  CHECK_THROWS_AS(BitLinear(0, 3), bitnet::shape_error);
  CHECK_THROWS_AS(BitLinear(5, 3, true, bitnet::bitlinear_options{.rms_norm = false, .rms_eps = 0}), bitnet::value_error);
  bitnet::bitlinear_options frozen;
  frozen.scale_update = bitnet::weight_scale_update::frozen;
  CHECK_THROWS_WITH_AS(BitLinear(5, 3, true, frozen), doctest::Contains("only absmean scales"), bitnet::value_error);
  CHECK_THROWS_AS(BitLinear(torch::zeros({3, 5}, torch::kHalf), torch::Tensor()), bitnet::value_error);
  CHECK_THROWS_AS(BitLinear(torch::zeros({3, 5}), torch::zeros({4})), bitnet::shape_error);
  CHECK_THROWS_AS(BitLinear(torch::zeros({3, 5}), torch::zeros({3}, torch::kDouble)), bitnet::value_error);

  torch::NoGradGuard no_grad;
  layer->eval();
  CHECK_THROWS_AS(layer->forward(torch::zeros({2, 4})), bitnet::shape_error);
  CHECK_THROWS_AS(layer->forward(torch::zeros({2, 5}, torch::kDouble)), bitnet::value_error);
  CHECK_THROWS_AS(layer->forward(torch::zeros({2, 5}, torch::kHalf)), bitnet::value_error);
  CHECK_THROWS_AS(layer->forward(torch::zeros({2, 5}, torch::kInt)), bitnet::value_error);
  torch::Tensor x = torch::zeros({1, 5});
  x[0][2] = std::nan("");
  CHECK_THROWS_AS(layer->forward(x), bitnet::value_error);
  CHECK_THROWS_AS(layer->set_lambda(1.5), bitnet::value_error);
  CHECK_THROWS_AS(layer->set_lambda(std::nan("")), bitnet::value_error);
  // A module converted to half is refused at the next forward, not silently computed in float.
  layer->to(torch::kHalf);
  CHECK_THROWS_AS(layer->forward(torch::zeros({1, 5}, torch::kHalf)), bitnet::value_error);
}

TEST_CASE("torch BitLinear: re-packs when the weight or bias tensor changed (version counter), never per call") {
  torch::manual_seed(2);
  BitLinear layer(torch::randn({8, 16}).requires_grad_(), torch::randn({8}).requires_grad_());
  layer->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({4, 16});
  const auto expected_for = [&] {
    const bitnet::BitLinear<float> reference(to_matrix<float>(layer->weight),
                                             Vector<float>(to_matrix<float>(layer->bias.view({1, -1})).transpose()));
    return to_tensor<float>(reference.forward(to_matrix<float>(x)));
  };
  const torch::Tensor first = layer->forward(x);
  for (int i = 0; i < 3; ++i) CHECK(same_bits(layer->forward(x), first));
  CHECK(layer->pack_count() == 1);

  layer->weight.mul_(-1);  // in place: the version counter moves
  const torch::Tensor flipped = layer->forward(x);
  CHECK(layer->pack_count() == 2);
  CHECK(same_bits(flipped, expected_for()));
  CHECK(!same_bits(flipped, first));

  layer->bias.add_(1);  // only the bias: no re-pack of the weights, but the new bias is used
  const torch::Tensor shifted = layer->forward(x);
  CHECK(layer->pack_count() == 2);
  CHECK(same_bits(shifted, expected_for()));

  layer->weight.set_data(torch::randn({8, 16}));  // new storage
  CHECK(same_bits(layer->forward(x), expected_for()));
  CHECK(layer->pack_count() == 3);

  // An optimizer step changes the weights in place: the next eval forward sees them.
  {
    torch::AutoGradMode grad(true);
    layer->train();
    torch::optim::SGD sgd(layer->parameters(), 0.5);
    sgd.zero_grad();
    layer->forward(x).square().sum().backward();
    sgd.step();
    layer->eval();
  }
  CHECK(same_bits(layer->forward(x), expected_for()));
  CHECK(layer->pack_count() == 4);  // libtorch's SGD writes through p.data(): the training forward invalidated
  layer->train();
  layer->eval();
  CHECK(same_bits(layer->forward(x), expected_for()));
  CHECK(layer->pack_count() == 4);  // switching modes alone changes nothing
  // AdamW updates the tensor in place (version counter), with this module never running a training forward.
  {
    torch::AutoGradMode grad(true);
    torch::optim::AdamW adamw(layer->parameters(), torch::optim::AdamWOptions(0.1));
    adamw.zero_grad();
    torch::nn::functional::linear(x, layer->weight, layer->bias).square().sum().backward();
    adamw.step();
  }
  CHECK(same_bits(layer->forward(x), expected_for()));
  CHECK(layer->pack_count() == 5);
  // A write the version counter cannot see (through .data()) needs invalidate_packed().
  layer->weight.data().mul_(2);
  layer->invalidate_packed();
  CHECK(same_bits(layer->forward(x), expected_for()));
  CHECK(layer->pack_count() == 6);

  layer->weight[0][0] = std::nan("");
  CHECK_THROWS_AS(layer->forward(x), bitnet::value_error);
}

// ---- gradients against PyTorch (tests/data/make_training_reference.py) --------------------------

using training_reference::read_reference;
using training_reference::reference_case;

torch::Tensor reference_tensor(const reference_case& c, const std::string& name, std::vector<std::int64_t> shape) {
  const auto it = c.tensors.find(name);
  REQUIRE_MESSAGE(it != c.tensors.end(), c.name << ": no tensor " << name);
  const torch::Tensor values = torch::tensor(it->second, torch::kDouble).view(shape);
  return values.to(c.dtype == "f32" ? torch::kFloat : torch::kDouble);  // exact: written from that dtype
}

// The largest |a - b| / (ulp scale of the magnitude), so a bound reads as "k units in the last place".
double worst_ulps(const torch::Tensor& ours, const torch::Tensor& theirs) {
  const torch::Tensor a = ours.detach().to(torch::kDouble), b = theirs.detach().to(torch::kDouble);
  const double u = ours.scalar_type() == torch::kFloat ? std::ldexp(1.0, -24) : std::ldexp(1.0, -53);
  const double scale = std::max(b.abs().max().item<double>(), 1e-30);
  return ((a - b).abs().max().item<double>()) / (scale * u);
}

TEST_CASE("torch BitLinear: training gradients through autograd match PyTorch's BitLinear and bitnet::backward") {
  torch::set_num_threads(1);
  const std::vector<reference_case> cases = read_reference(BITNET_TEST_DATA_DIR "/training_reference.txt");
  REQUIRE(cases.size() == 9);
  for (const reference_case& c : cases) {
    CAPTURE(c.name);
    const torch::Tensor x = reference_tensor(c, "x", {c.batch, c.in}).requires_grad_(true);
    const torch::Tensor w = reference_tensor(c, "w", {c.out, c.in});
    const torch::Tensor b = c.bias ? reference_tensor(c, "b", {c.out}) : torch::Tensor();
    const torch::Tensor dy = reference_tensor(c, "dy", {c.batch, c.out});
    BitLinear layer(w.clone().requires_grad_(true), c.bias ? b.clone().requires_grad_(true) : torch::Tensor(),
                    bitnet::bitlinear_options{.rms_norm = c.rms, .rms_eps = float(c.eps)});
    layer->set_lambda(c.lambda);
    layer->train();
    const torch::Tensor y = layer->forward(x);
    y.backward(dy);
    // The same torch ops in the same order as the Python module: the same bits, up to the summation
    // order of the matrix products (a few units in the last place of the largest element).
    CHECK(worst_ulps(y, reference_tensor(c, "y", {c.batch, c.out})) <= 4 * double(c.in));
    CHECK(worst_ulps(x.grad(), reference_tensor(c, "dx", {c.batch, c.in})) <= 4 * double(c.out + c.in));
    CHECK(worst_ulps(layer->weight.grad(), reference_tensor(c, "dw", {c.out, c.in})) <= 4 * double(c.batch));
    if (c.bias) CHECK(worst_ulps(layer->bias.grad(), reference_tensor(c, "db", {c.out})) <= 4 * double(c.batch));

    // bitnet::backward on the same layer: the same gradients (its own reductions in double).
    const auto against_bitnet = [&]<class T>(T) {
      const bitnet::BitLinear<T> bit(to_matrix<T>(w), c.bias ? std::optional<Vector<T>>(to_matrix<T>(b.view({-1, 1})))
                                                             : std::nullopt,
                                     {.rms_norm = c.rms, .rms_eps = float(c.eps)});
      const auto [y_bit, tape] = bitnet::train_forward(bit, to_matrix<T>(x), T(c.lambda));
      const auto grads = bitnet::backward(tape, to_matrix<T>(dy));
      const double bound = 8 * double(c.in + c.out + c.batch);
      CHECK(worst_ulps(to_tensor<T>(y_bit), y) <= bound * 4);
      CHECK(worst_ulps(to_tensor<T>(grads.input), x.grad()) <= bound * 4);
      CHECK(worst_ulps(to_tensor<T>(grads.weight), layer->weight.grad()) <= bound);
      if (c.bias) CHECK(worst_ulps(to_tensor<T>(Matrix<T>(*grads.bias)).view({-1}), layer->bias.grad()) <= bound);
    };
    if (c.dtype == "f32")
      against_bitnet(float{});
    else
      against_bitnet(double{});
  }
}

TEST_CASE("torch BitLinear: lambda 0 is the float Linear, eval mode is the ternary layer whatever lambda") {
  torch::manual_seed(3);
  const torch::Tensor w = torch::randn({6, 10}), b = torch::randn({6}), x = torch::randn({3, 10});
  BitLinear layer(w.clone(), b.clone());
  layer->set_lambda(0);
  layer->train();
  CHECK(same_bits(layer->forward(x), torch::nn::functional::linear(x, w, b)));
  layer->set_lambda(0.25);
  const torch::Tensor warm = layer->forward(x);
  layer->eval();
  torch::NoGradGuard no_grad;
  const bitnet::BitLinear<float> reference(to_matrix<float>(w), Vector<float>(to_matrix<float>(b.view({-1, 1}))));
  CHECK(same_bits(layer->forward(x), to_tensor<float>(reference.forward(to_matrix<float>(x)))));
  CHECK(!same_bits(warm, layer->forward(x)));
}

// ---- replace_linear over module trees ---------------------------------------------------------------

torch::Tensor run_child(const std::shared_ptr<nn::Module>& m, const torch::Tensor& x) {
  if (auto linear = std::dynamic_pointer_cast<nn::LinearImpl>(m)) return linear->forward(x);
  if (auto bit = std::dynamic_pointer_cast<BitLinearImpl>(m)) return bit->forward(x);
  FAIL("not a linear layer");
  return {};
}

// A user module with registered children of every kind: a Sequential, a ModuleList of blocks that keep
// their layers in a ModuleDict, a Linear registered directly (reached by name), and one Linear shared
// by the Sequential and the last block.
struct BlockImpl : nn::Module {
  BlockImpl(int width, const nn::Linear& shared) {
    layers = register_module("mlp", nn::ModuleDict(std::vector<std::pair<std::string, std::shared_ptr<nn::Module>>>{
                                        {"up", nn::Linear(width, 2 * width).ptr()},
                                        {"down", shared ? shared.ptr() : nn::Linear(2 * width, width).ptr()}}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return x + run_child(layers["down"], torch::relu(run_child(layers["up"], x)));
  }
  nn::ModuleDict layers{nullptr};
};
TORCH_MODULE(Block);

struct NetImpl : nn::Module {
  explicit NetImpl(int width = 8) {
    nn::Linear shared(2 * width, width);
    body = register_module("body", nn::Sequential(nn::Linear(width, 2 * width), nn::ReLU(), shared));
    blocks = register_module("blocks", nn::ModuleList());
    for (int i = 0; i < 3; ++i) blocks->push_back(Block(width, i == 2 ? shared : nn::Linear(nullptr)));
    register_module("head", nn::Linear(nn::LinearOptions(width, 4).bias(false)));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = body->forward(x);
    for (const auto& block : *blocks) x = block->as<BlockImpl>()->forward(x);
    return run_child(named_children()["head"], x);
  }
  nn::Sequential body{nullptr};
  nn::ModuleList blocks{nullptr};
};
TORCH_MODULE(Net);

const std::vector<std::string> net_linear_paths = {"body.0", "body.2", "blocks.0.mlp.up", "blocks.0.mlp.down",
                                                   "blocks.1.mlp.up", "blocks.1.mlp.down", "blocks.2.mlp.up",
                                                   "head"};  // blocks.2.mlp.down is body.2, shared

// Everything that must come back unchanged after a failed replace_linear: which module object sits in
// every registry slot and container entry, and every parameter's name and bits.
struct tree_snapshot {
  std::vector<std::pair<std::string, const void*>> slots;
  std::vector<std::pair<std::string, torch::Tensor>> parameters;

  explicit tree_snapshot(nn::Module& root) {
    for (const auto& item : root.named_modules("", false)) {
      for (const auto& child : item.value()->named_children())
        slots.emplace_back(item.key() + "/" + child.key(), child.value().get());
      if (auto* seq = dynamic_cast<nn::SequentialImpl*>(item.value().get()))
        for (const auto& entry : *seq) slots.emplace_back(item.key() + "[seq]", entry.ptr().get());
      if (auto* list = dynamic_cast<nn::ModuleListImpl*>(item.value().get()))
        for (const auto& entry : *list) slots.emplace_back(item.key() + "[list]", entry.get());
      if (auto* dict = dynamic_cast<nn::ModuleDictImpl*>(item.value().get()))
        for (const auto& entry : *dict) slots.emplace_back(item.key() + "[" + entry.key() + "]", entry.value().get());
    }
    for (const auto& p : root.named_parameters()) parameters.emplace_back(p.key(), p.value().detach().clone());
  }

  void check_same(nn::Module& root) const {
    const tree_snapshot now(root);
    CHECK((now.slots == slots));
    REQUIRE(now.parameters.size() == parameters.size());
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      CHECK(now.parameters[i].first == parameters[i].first);
      CHECK(same_bits(now.parameters[i].second, parameters[i].second));
    }
  }
};

std::vector<std::string> parameter_names(nn::Module& m) { return m.named_parameters().keys(); }

TEST_CASE_TEMPLATE("torch replace_linear: every Linear of every container kind, keys unchanged, the tree runs the new "
                   "layers", Policy, bitnet::transfer::checked, bitnet::transfer::copy, bitnet::transfer::move) {
  torch::manual_seed(4);
  Net net;
  const std::vector<std::string> names = parameter_names(*net);
  std::map<std::string, torch::Tensor> old_weights;
  for (const auto& p : net->named_parameters()) old_weights[p.key()] = p.value();  // tensor handles, not modules
  const torch::Tensor x = torch::randn({5, 8});

  const bitnet::libtorch::module_replace_report report = bitnet::libtorch::replace_linear<Policy>(net);
  std::vector<std::string> paths;
  for (const auto& row : report.layers) paths.push_back(row.path);
  CHECK((paths == net_linear_paths));
  CHECK(report.kept.empty());
  CHECK((parameter_names(*net) == names));
  for (const auto& item : net->named_modules("", false))
    CHECK_MESSAGE(!item.value()->template as<nn::LinearImpl>(), item.key());
  CHECK(report.to_string().find(Policy::takes_buffers ? "keep updating them" : "rebuild any optimizer") !=
        std::string::npos);
  CHECK(report.to_string().find("shared") != std::string::npos);

  // The shared Linear became one BitLinear, in the Sequential's own list, its registry and the block's dict.
  const auto in_body = net->body->ptr(2);
  CHECK(dynamic_cast<BitLinearImpl*>(in_body.get()));
  CHECK(net->body->named_children()["2"] == in_body);
  CHECK(net->blocks[2]->as<BlockImpl>()->layers["down"] == in_body);
  CHECK(net->blocks[2]->as<BlockImpl>()->layers->named_children()["down"] == in_body);

  for (const auto& p : net->named_parameters()) {
    CAPTURE(p.key());
    const torch::Tensor& old = old_weights.at(p.key());
    CHECK(same_bits(p.value(), old));
    CHECK(p.value().requires_grad() == old.requires_grad());
    if (Policy::takes_buffers)
      CHECK(p.value().unsafeGetTensorImpl() == old.unsafeGetTensorImpl());  // move: the same tensor
    else
      CHECK(p.value().storage().unsafeGetStorageImpl() != old.storage().unsafeGetStorageImpl());
  }
  if (!Policy::takes_buffers) {
    torch::NoGradGuard no_grad;
    std::map<std::string, torch::Tensor> kept;
    for (const auto& p : net->named_parameters()) kept[p.key()] = p.value().clone();
    for (auto& [name, old] : old_weights) old.add_(1);  // copy: changing the old tensors changes nothing
    for (const auto& p : net->named_parameters()) CHECK(same_bits(p.value(), kept.at(p.key())));
  }

  // The tree's forward now runs the kernels: Sequential, ModuleList, ModuleDict and the registry.
  net->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor expected = x;
  const auto kernel = [](const std::shared_ptr<nn::Module>& m, const torch::Tensor& in) {
    auto& bit = dynamic_cast<BitLinearImpl&>(*m);
    const bitnet::BitLinear<float> reference(to_matrix<float>(bit.weight),
                                             bit.bias.defined() ? std::optional<Vector<float>>(to_matrix<float>(bit.bias.view({-1, 1})))
                                                                : std::nullopt);
    return to_tensor<float>(reference.forward(to_matrix<float>(in)));
  };
  expected = kernel(net->body->ptr(2), torch::relu(kernel(net->body->ptr(0), expected)));
  for (const auto& block : *net->blocks) {
    auto& dict = block->as<BlockImpl>()->layers;
    expected = expected + kernel(dict["down"], torch::relu(kernel(dict["up"], expected)));
  }
  expected = kernel(net->named_children()["head"], expected);
  CHECK(same_bits(net->forward(x), expected));
}

TEST_CASE("torch replace_linear: Linear layers straight in a ModuleList and in a Sequential with named entries") {
  torch::manual_seed(10);
  auto list = nn::ModuleList(nn::Linear(5, 5), nn::Linear(5, 5));
  auto named = nn::Sequential(torch::OrderedDict<std::string, nn::AnyModule>(
      {{"fc1", nn::AnyModule(nn::Linear(5, 6))}, {"act", nn::AnyModule(nn::ReLU())}, {"fc2", nn::AnyModule(nn::Linear(6, 2))}}));
  const auto list_report = bitnet::libtorch::replace_linear(list);
  const auto named_report = bitnet::libtorch::replace_linear(named);
  REQUIRE(list_report.layers.size() == 2);
  CHECK(list_report.layers[1].path == "1");
  REQUIRE(named_report.layers.size() == 2);
  CHECK(named_report.layers[1].path == "fc2");
  CHECK((parameter_names(*named) == std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  // The containers' own storage holds the new modules, not only the registry.
  for (const auto& entry : *list) CHECK(entry->as<BitLinearImpl>());
  CHECK(list->named_children()["0"] == list->ptr(0));
  CHECK(named->ptr(0)->as<BitLinearImpl>());
  CHECK(named->ptr(2)->as<BitLinearImpl>());
  CHECK(named->named_children()["fc2"] == named->ptr(2));
  named->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({3, 5});
  auto* fc1 = named->ptr(0)->as<BitLinearImpl>();
  auto* fc2 = named->ptr(2)->as<BitLinearImpl>();
  CHECK(same_bits(named->forward(x), fc2->forward(torch::relu(fc1->forward(x)))));
  CHECK(fc1->pack_count() == 1);  // the layer replace_linear packed to verify is the one eval uses
}

TEST_CASE_TEMPLATE("torch replace_linear: requires_grad and float64 travel with the parameters", Policy,
                   bitnet::transfer::checked, bitnet::transfer::copy, bitnet::transfer::move) {
  auto seq = nn::Sequential(nn::Linear(4, 3), nn::Linear(3, 2));
  seq->to(torch::kDouble);
  seq->ptr(0)->as<nn::LinearImpl>()->weight.requires_grad_(false);  // a frozen layer stays frozen
  bitnet::libtorch::replace_linear<Policy>(seq);
  auto* first = seq->ptr(0)->as<BitLinearImpl>();
  auto* second = seq->ptr(1)->as<BitLinearImpl>();
  REQUIRE(first);
  REQUIRE(second);
  CHECK(!first->weight.requires_grad());
  CHECK(first->bias.requires_grad());
  CHECK(second->weight.requires_grad());
  CHECK((first->weight.scalar_type() == torch::kDouble));
  CHECK((second->bias.scalar_type() == torch::kDouble));
}

TEST_CASE("torch BitLinear: eval forwards from two threads after a weight change pack once and agree") {
  torch::manual_seed(11);
  BitLinear layer(64, 32, false);
  layer->eval();
  const torch::Tensor x = torch::randn({3, 64});
  torch::Tensor expected;
  {
    torch::NoGradGuard no_grad;
    expected = layer->forward(x);
    layer->weight.neg_();
  }
  torch::Tensor outputs[2];
  std::thread threads[2];
  for (int t = 0; t < 2; ++t)
    threads[t] = std::thread([&, t] {
      torch::NoGradGuard no_grad;  // grad mode is per thread
      outputs[t] = layer->forward(x);
    });
  for (auto& t : threads) t.join();
  CHECK(same_bits(outputs[0], outputs[1]));
  CHECK(same_bits(outputs[0], -expected));  // -W: the codes flip sign, the scale stays, no bias: exactly -y
  CHECK(layer->pack_count() == 2);
}

TEST_CASE("torch replace_linear: a root module that lives on the stack") {
  nn::SequentialImpl root(nn::Linear(3, 3), nn::ReLU(), nn::Linear(3, 2));
  bitnet::replace_options per_layer;
  per_layer.layer_options_for = [](std::string_view, const bitnet::linear_info&) { return bitnet::bitlinear_options{}; };
  CHECK_THROWS_WITH_AS(bitnet::libtorch::replace_linear(root, per_layer),
                       doctest::Contains("layer_options_for (per-layer options) is not supported"), bitnet::value_error);
  CHECK(root.ptr(2)->as<nn::LinearImpl>());
  CHECK(bitnet::libtorch::replace_linear(root).layers.size() == 2);
  CHECK(root.ptr(2)->as<BitLinearImpl>());
}

struct throwing_policy : bitnet::transfer::checked {
  int throw_at = -1;
  bool in_verify = false;
  bool bad_alloc = false;
  int seen = 0;
  template <class T>
  void prepare(const bitnet::layer_source<T>& source) {
    checked::prepare(source);
    if (!in_verify) maybe_throw();
  }
  template <class T>
  void verify(const bitnet::layer_source<T>& source, const bitnet::BitLinear<T>& staged) {
    checked::verify(source, staged);
    if (in_verify) maybe_throw();
  }
  void maybe_throw() {
    if (seen++ != throw_at) return;
    if (bad_alloc) throw std::bad_alloc();
    throw bitnet::value_error("policy refused");
  }
};

TEST_CASE("torch replace_linear: a failure at any layer leaves the tree exactly as it was") {
  torch::manual_seed(5);
  Net net;
  const tree_snapshot before(*net);
  const int layers = int(net_linear_paths.size());
  for (int at = 0; at < layers; ++at)
    for (const bool in_verify : {false, true}) {
      CAPTURE(at);
      CAPTURE(in_verify);
      throwing_policy policy;
      policy.throw_at = at;
      policy.in_verify = in_verify;
      try {
        bitnet::libtorch::replace_linear(*net, {}, policy);
        FAIL("no exception");
      } catch (const bitnet::transfer_error& e) {
        CHECK(std::string(e.what()).find(net_linear_paths[std::size_t(at)] + ": policy refused") != std::string::npos);
      }
      before.check_same(*net);
      policy = throwing_policy{};
      policy.throw_at = at;
      policy.bad_alloc = true;
      CHECK_THROWS_AS(bitnet::libtorch::replace_linear(*net, {}, policy), std::bad_alloc);
      before.check_same(*net);
    }
  // A NaN weight in any layer, under every policy: transfer_error naming the path.
  for (int at = 0; at < layers; ++at) {
    CAPTURE(at);
    const std::string path = net_linear_paths[std::size_t(at)];
    torch::Tensor weight = net->named_parameters()[path + ".weight"];
    const float saved = weight[0][1].item<float>();
    {
      torch::NoGradGuard no_grad;
      weight[0][1] = std::nan("");
    }
    const tree_snapshot poisoned(*net);
    const auto check_fails = [&](auto policy) {
      try {
        bitnet::libtorch::replace_linear<decltype(policy)>(*net);
        FAIL("no exception");
      } catch (const bitnet::transfer_error& e) {
        CHECK(std::string(e.what()).find("replace_linear: " + path + ": ") != std::string::npos);
      }
      poisoned.check_same(*net);
    };
    check_fails(bitnet::transfer::checked{});
    check_fails(bitnet::transfer::copy{});
    check_fails(bitnet::transfer::move{});
    torch::NoGradGuard no_grad;
    weight[0][1] = saved;
  }
  before.check_same(*net);
  // And after all that, the swap works.
  CHECK(bitnet::libtorch::replace_linear(net).layers.size() == net_linear_paths.size());
}

bitnet::replace_options excluding(const char* pattern) {
  bitnet::replace_options options;
  options.exclude = {pattern};
  return options;
}

struct TypedImpl : nn::Module {
  TypedImpl() { fc = register_module("fc", nn::Linear(4, 4)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc->forward(x); }
  nn::Linear fc{nullptr};  // the forward would keep calling this one after a registry swap
};
TORCH_MODULE(Typed);

TEST_CASE("torch replace_linear: options, dry run, outside holders, unsupported dtypes") {
  torch::manual_seed(6);
  SUBCASE("exclude rules and the predicate keep layers; the report says why") {
    Net net;
    bitnet::replace_options options;
    options.exclude = {"head", bitnet::exclude_rule::prefix("blocks.0")};
    options.predicate = [](std::string_view, const bitnet::linear_info& info) { return info.out_features != 16; };
    const auto report = bitnet::libtorch::replace_linear(net, options);
    std::vector<std::string> paths;
    for (const auto& row : report.layers) paths.push_back(row.path);
    CHECK((paths == std::vector<std::string>{"body.2", "blocks.1.mlp.down"}));
    REQUIRE(report.kept.size() == 6);
    CHECK(report.kept[0].path == "body.0");
    CHECK(report.kept[0].reason == "rejected by the predicate");
    CHECK(report.kept.back().path == "head");
    CHECK(report.kept.back().reason == "excluded by components \"head\"");
    CHECK(net->named_children()["head"]->as<nn::LinearImpl>());
    CHECK(net->body->ptr(0)->as<nn::LinearImpl>());
  }
  SUBCASE("layer options reach every new layer") {
    Net net;
    bitnet::replace_options options;
    options.layer_options = {.rms_norm = true, .rms_eps = 1e-5f};
    bitnet::libtorch::replace_linear(net, options);
    for (const auto& m : net->modules())
      if (auto* bit = m->as<BitLinearImpl>()) CHECK((bit->options().rms_norm && bit->options().rms_eps == 1e-5f));
  }
  SUBCASE("a dry run reports and changes nothing") {
    Net net;
    const tree_snapshot before(*net);
    bitnet::replace_options options;
    options.dry_run = true;
    const auto report = bitnet::libtorch::replace_linear<bitnet::transfer::move>(net, options);
    CHECK(report.dry_run);
    CHECK(report.layers.size() == net_linear_paths.size());
    CHECK(report.layers[0].in_features == 8);
    CHECK(report.layers[0].out_features == 16);
    before.check_same(*net);
  }
  SUBCASE("a Linear a typed member still holds is refused, naming it") {
    auto seq = nn::Sequential(Typed(), nn::Linear(4, 4));
    const tree_snapshot before(*seq);
    CHECK_THROWS_WITH_AS(bitnet::libtorch::replace_linear(seq), doctest::Contains("0.fc: this torch::nn::Linear is also held"),
                         bitnet::transfer_error);
    before.check_same(*seq);
    CHECK(bitnet::libtorch::replace_linear(seq, excluding("fc")).layers.size() == 1);
  }
  SUBCASE("half-precision layers are refused unless excluded; the root must not be a Linear") {
    auto seq = nn::Sequential(nn::Linear(4, 4), nn::Linear(4, 4));
    seq[1]->to(torch::kHalf);
    CHECK_THROWS_WITH_AS(bitnet::libtorch::replace_linear(seq), doctest::Contains("1: the weight is Half"),
                         bitnet::transfer_error);
    CHECK(seq->ptr(0)->as<nn::LinearImpl>());
    CHECK(bitnet::libtorch::replace_linear(seq, excluding("1")).layers.size() == 1);
    nn::Linear root(3, 3);
    CHECK_THROWS_AS(bitnet::libtorch::replace_linear(root), bitnet::transfer_error);
  }
  SUBCASE("float64 layers become float64 BitLinear layers") {
    auto seq = nn::Sequential(nn::Linear(6, 5));
    seq->to(torch::kDouble);
    bitnet::libtorch::replace_linear(seq);
    CHECK((seq->ptr(0)->as<BitLinearImpl>()->weight.scalar_type() == torch::kDouble));
    seq->eval();
    torch::NoGradGuard no_grad;
    CHECK((seq->forward(torch::ones({2, 6}, torch::kDouble)).scalar_type() == torch::kDouble));
  }
}

TEST_CASE("torch verify_replacement: catches the seed's bug, a swapped layer that never got the weights") {
  torch::manual_seed(7);
  nn::Linear source(12, 6);
  BitLinear shape_only(12, 6);  // the right shape, freshly initialized: what the seed's script built
  CHECK_THROWS_WITH_AS(bitnet::libtorch::verify_replacement("blocks.3.mlp.down", *source, *shape_only),
                       doctest::Contains("blocks.3.mlp.down: the new layer's weight differs"), bitnet::transfer_error);
  BitLinear no_bias(source->weight.detach().clone().requires_grad_(true), torch::Tensor());
  CHECK_THROWS_WITH_AS(bitnet::libtorch::verify_replacement("fc", *source, *no_bias), doctest::Contains("lost the bias"),
                       bitnet::transfer_error);
  BitLinear aliased(source->weight, source->bias);  // what `new.weight = old.weight` gives
  CHECK_THROWS_WITH_AS(bitnet::libtorch::verify_replacement("fc", *source, *aliased),
                       doctest::Contains("shares the source's storage"), bitnet::transfer_error);
  CHECK_NOTHROW(bitnet::libtorch::verify_replacement("fc", *source, *aliased, true));
  torch::Tensor w, b;
  {
    torch::NoGradGuard no_grad;
    w = source->weight.clone();
    b = source->bias.clone();
  }
  BitLinear copied(w.requires_grad_(true), b.requires_grad_(true));
  CHECK_NOTHROW(bitnet::libtorch::verify_replacement("fc", *source, *copied));
  copied->bias.detach().add_(1e-7);
  CHECK_THROWS_WITH_AS(bitnet::libtorch::verify_replacement("fc", *source, *copied),
                       doctest::Contains("bias differs"), bitnet::transfer_error);
}

TEST_CASE("torch replace_linear: a converted tree saves and loads with torch::save / torch::load, and clones") {
  torch::manual_seed(8);
  Net trained, fresh;
  bitnet::libtorch::replace_linear(trained);
  bitnet::libtorch::replace_linear(fresh);
  trained->eval();
  fresh->eval();
  const torch::Tensor x = torch::randn({3, 8});
  torch::NoGradGuard no_grad;
  const torch::Tensor expected = trained->forward(x);
  CHECK(!same_bits(fresh->forward(x), expected));  // packed once with its own weights
  const std::string path = "bitnet_torch_test_checkpoint.pt";
  torch::save(trained, path);
  torch::load(fresh, path);
  std::remove(path.c_str());
  CHECK(same_bits(fresh->forward(x), expected));  // loading changed the tensors: re-packed
}

TEST_CASE("torch BitLinear: clone() copies the parameters and packs its own") {
  torch::manual_seed(9);
  auto seq = nn::Sequential(nn::Linear(6, 4), nn::ReLU(), nn::Linear(nn::LinearOptions(4, 3).bias(false)));
  bitnet::libtorch::replace_linear(seq);
  auto copy = std::dynamic_pointer_cast<nn::SequentialImpl>(seq->clone());
  REQUIRE(copy);
  CHECK((parameter_names(*copy) == parameter_names(*seq)));
  auto* original = seq->ptr(0)->as<BitLinearImpl>();
  auto* cloned = copy->ptr(0)->as<BitLinearImpl>();
  REQUIRE(cloned);
  CHECK(same_bits(cloned->weight, original->weight));
  CHECK(cloned->weight.storage().unsafeGetStorageImpl() != original->weight.storage().unsafeGetStorageImpl());
  CHECK(!copy->ptr(2)->as<BitLinearImpl>()->bias.defined());
  seq->eval();
  copy->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({2, 6});
  CHECK(same_bits(copy->forward(x), seq->forward(x)));
}

}  // namespace

#if BITNET_TEST_TORCH_STATE_DICT
// ---- whole trees in safetensors files and Hugging Face folders (bitnet/torch_state_dict.hpp) ---------

namespace {

namespace fs = std::filesystem;
namespace hf = bitnet::hf;
namespace st = bitnet::safetensors;
using bitnet::bit_linear_storage;

struct scratch_dir {
  fs::path path;
  scratch_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("bitnet_torch_state_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

// Linear layers (one with 6 outputs: not a multiple of 4, so the file declares it), a BatchNorm with
// float buffers and an int64 one, and a bias-less layer.
nn::Sequential state_tree(int seed, bool convert = true) {
  torch::manual_seed(seed);
  auto tree = nn::Sequential(nn::Linear(8, 16), nn::BatchNorm1d(16), nn::ReLU(), nn::Linear(16, 6),
                             nn::Linear(nn::LinearOptions(6, 4).bias(false)));
  {
    torch::NoGradGuard no_grad;
    auto* norm = tree->ptr(1)->as<nn::BatchNorm1dImpl>();
    norm->running_mean.uniform_(-1, 1);
    norm->running_var.uniform_(0.5, 2);
    norm->num_batches_tracked.fill_(seed);
    norm->weight.uniform_(0.5, 1.5);
    norm->bias.uniform_(-0.5, 0.5);
  }
  if (convert) bitnet::libtorch::replace_linear(tree);
  tree->eval();
  return tree;
}

const std::vector<std::string> state_tree_layers = {"0", "3", "4"};

BitLinearImpl& bit_at(nn::Sequential& tree, const std::string& path) {
  auto* m = tree->ptr(std::size_t(std::stoi(path)))->as<BitLinearImpl>();
  REQUIRE(m);
  return *m;
}

std::map<std::string, torch::Tensor> state_of(nn::Module& m) {
  std::map<std::string, torch::Tensor> all;
  for (const auto& p : m.named_parameters()) all[p.key()] = p.value().detach().clone();
  for (const auto& b : m.named_buffers()) all[b.key()] = b.value().detach().clone();
  return all;
}

bool same_state(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [key, t] : a)
    if (!b.contains(key) || !same_bits(t, b.at(key))) return false;
  return true;
}

template <class F>
std::string error_text(F&& f) {
  try {
    f();
  } catch (const bitnet::error& e) {
    return e.what();
  }
  return "(no error)";
}

// Every BitLinear of the tree, layer by layer, against the layer hf::load_bit_linear reads from
// `file`: eval forward on the kernels bit for bit.
void check_layers_match_file(nn::Sequential& tree, const hf::checkpoint& file, const std::string& prefix = "") {
  torch::NoGradGuard no_grad;
  for (const std::string& path : state_tree_layers) {
    CAPTURE(path);
    BitLinearImpl& m = bit_at(tree, path);
    const auto expected_layer = hf::load_bit_linear<float>(file, prefix + path, m.out_features());
    const torch::Tensor x = torch::randn({3, m.in_features()});
    const Matrix<float> expected = expected_layer.forward(to_matrix<float>(x));
    CHECK(same_bits(m.forward(x), to_tensor(expected)));
  }
}

}  // namespace

TEST_CASE("torch state dict: packed round trip in both conventions - codes, scales and outputs bit for bit, no "
          "dense weight") {
  scratch_dir dir;
  for (const auto convention : {hf::scale_convention::bitlinear, hf::scale_convention::autobitlinear}) {
    CAPTURE(hf::convention_name(convention));
    nn::Sequential source = state_tree(1);
    const fs::path file = dir / (std::string(hf::convention_name(convention)) + ".safetensors");
    bitnet::libtorch::save_state_dict(*source, file,
                                      {.scale_convention = convention, .bit_linear = bit_linear_storage::hf_packed});
    const hf::checkpoint written(file);
    // Declared as save_state_dict declares it: the convention and the 6-output layer.
    REQUIRE(written.quantization());
    CHECK(*written.quantization()->linear_class == convention);
    CHECK(written.quantization()->mode == hf::quantization_mode::offline);
    CHECK(written.declared_out_features("3") == 6);
    CHECK(written.info("0.weight").type == st::dtype::U8);
    CHECK(written.info("1.num_batches_tracked").type == st::dtype::I64);

    nn::Sequential loaded = state_tree(2);
    const bitnet::state_dict_report report = bitnet::libtorch::load_state_dict(*loaded, file);
    CHECK(report.missing.empty());
    CHECK(report.unexpected.empty());
    CHECK(report.loaded.size() == written.tensors().size());
    // Packed-only modules: "weight" undefined, so named_parameters() shows only the biases.
    CHECK((parameter_names(*loaded) == std::vector<std::string>{"0.bias", "1.weight", "1.bias", "3.bias"}));
    for (const std::string& path : state_tree_layers) {
      CAPTURE(path);
      BitLinearImpl& m = bit_at(loaded, path);
      BitLinearImpl& original = bit_at(source, path);
      CHECK(m.packed_only());
      CHECK(!m.weight.defined());
      // Codes and scale exactly those of the source's packed layer (no dense weight was built).
      CHECK(m.packed<float>()->ternary_weight() == original.packed<float>()->ternary_weight());
      CHECK(m.packed<float>()->weight_scale() == original.packed<float>()->weight_scale());
      if (convention == hf::scale_convention::bitlinear && original.bias.defined())
        CHECK(same_bits(m.bias, original.bias));
    }
    CHECK(same_bits(loaded->ptr(1)->as<nn::BatchNorm1dImpl>()->running_var,
                    source->ptr(1)->as<nn::BatchNorm1dImpl>()->running_var));
    CHECK(loaded->ptr(1)->as<nn::BatchNorm1dImpl>()->num_batches_tracked.item<std::int64_t>() == 1);
    check_layers_match_file(loaded, written);
    {
      torch::NoGradGuard no_grad;
      const torch::Tensor x = torch::randn({5, 8});
      if (convention == hf::scale_convention::bitlinear)  // the bias is stored as it is: the whole tree agrees
        CHECK(same_bits(loaded->forward(x), source->forward(x)));
      else  // b * s stored, times m read: one rounding of the bias
        CHECK(torch::allclose(loaded->forward(x), source->forward(x), 1e-5, 1e-5));
    }

    // Saved again from the packed-only modules: the same codes and scales come back.
    const fs::path again = dir / "again.safetensors";
    bitnet::libtorch::save_state_dict(*loaded, again,
                                      {.scale_convention = convention, .bit_linear = bit_linear_storage::hf_packed});
    nn::Sequential reloaded = state_tree(3);
    bitnet::libtorch::load_state_dict(*reloaded, again);
    for (const std::string& path : state_tree_layers) {
      CHECK(bit_at(reloaded, path).packed<float>()->ternary_weight() ==
            bit_at(loaded, path).packed<float>()->ternary_weight());
      CHECK(bit_at(reloaded, path).packed<float>()->weight_scale() == bit_at(loaded, path).packed<float>()->weight_scale());
    }
    // A packed-only tree has no latent weights to save as such, and none to train.
    CHECK(error_text([&] { bitnet::libtorch::save_state_dict(*loaded, dir / "latent.safetensors"); })
              .find("packed-only") != std::string::npos);
    CHECK(!fs::exists(dir / "latent.safetensors"));
    loaded->train();
    const std::string training = error_text([&] { loaded->forward(torch::randn({2, 8})); });
    CHECK(training.find("\"0\"") != std::string::npos);
    CHECK(training.find("packed ternary weights") != std::string::npos);
    loaded->eval();
    CHECK_THROWS_AS(bit_at(loaded, "3").forward(torch::randn({2, 16})), bitnet::state_error);  // grad mode on
    CHECK_THROWS_AS(torch::save(loaded, (dir / "t.pt").string()), bitnet::state_error);
  }
}

TEST_CASE("torch state dict: a packed-only module clones with its packed weights, re-biases, and an online file "
          "makes it trainable again") {
  scratch_dir dir;
  nn::Sequential source = state_tree(4);
  bitnet::libtorch::save_state_dict(*source, dir / "packed.safetensors", {.bit_linear = bit_linear_storage::hf_packed});
  bitnet::libtorch::save_state_dict(*source, dir / "online.safetensors");
  nn::Sequential tree = state_tree(5);
  bitnet::libtorch::load_state_dict(*tree, dir / "packed.safetensors");
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({2, 8});
  auto copy = std::dynamic_pointer_cast<nn::SequentialImpl>(tree->clone());
  REQUIRE(copy);
  CHECK(copy->ptr(0)->as<BitLinearImpl>()->packed_only());
  CHECK(same_bits(copy->forward(x), tree->forward(x)));
  // A bias change reaches the packed-only layer's kernels.
  BitLinearImpl& first = bit_at(tree, "0");
  const torch::Tensor h = torch::randn({2, 8});
  const auto packed = first.packed<float>();
  const std::int64_t packs = first.pack_count();
  first.bias.add_(1.0);
  const auto expected = bitnet::BitLinear<float>::from_ternary(packed->ternary_weight(), packed->weight_scale(),
                                                               Vector<float>(*packed->bias() + Vector<float>::Ones(16)));
  CHECK(same_bits(first.forward(h), to_tensor(expected.forward(to_matrix<float>(h)))));
  CHECK(first.pack_count() == packs);  // the codes were not packed again

  const bitnet::state_dict_report report = bitnet::libtorch::load_state_dict(*tree, dir / "online.safetensors");
  CHECK(report.missing.empty());
  CHECK(!bit_at(tree, "0").packed_only());
  CHECK((parameter_names(*tree) == parameter_names(*source)));
  CHECK(same_state(state_of(*tree), state_of(*source)));
  CHECK(same_bits(tree->forward(x), source->forward(x)));
}

TEST_CASE_TEMPLATE("torch state dict: online round trip - every parameter and buffer bit for bit, still trainable", T,
                   float, double) {
  scratch_dir dir;
  nn::Sequential source = state_tree(6);
  source->to(dtype_of<T>());
  const fs::path file = dir / "online.safetensors";
  bitnet::libtorch::save_state_dict(*source, file);
  const hf::checkpoint written(file);
  REQUIRE(written.quantization());
  CHECK(written.quantization()->mode == hf::quantization_mode::online);  // as convert_model's online mode
  CHECK(*written.quantization()->linear_class == hf::scale_convention::autobitlinear);
  CHECK(written.info("0.weight").type == st::dtype_of<T>());

  nn::Sequential loaded = state_tree(7);
  loaded->to(dtype_of<T>());
  torch::Tensor weight_before = bit_at(loaded, "0").weight;  // an optimizer's handle
  bitnet::libtorch::load_state_dict(*loaded, file);
  CHECK(same_state(state_of(*loaded), state_of(*source)));
  CHECK(same_bits(weight_before, bit_at(source, "0").weight));  // copied in: handles held elsewhere see it
  {
    torch::NoGradGuard no_grad;
    const torch::Tensor x = torch::randn({4, 8}, dtype_of<T>());
    CHECK(same_bits(loaded->forward(x), source->forward(x)));
  }
  loaded->train();
  loaded->forward(torch::randn({4, 8}, dtype_of<T>())).sum().backward();
  CHECK(bit_at(loaded, "0").weight.grad().defined());

  // Packed in this dtype: the scale and bias in T, the kernels' layer of T.
  const fs::path packed_file = dir / "packed.safetensors";
  bitnet::libtorch::save_state_dict(*source, packed_file, {.bit_linear = bit_linear_storage::hf_packed});
  CHECK(hf::checkpoint(packed_file).info("0.weight_scale").type == st::dtype_of<T>());
  nn::Sequential packed = state_tree(7);
  packed->to(dtype_of<T>());
  bitnet::libtorch::load_state_dict(*packed, packed_file);
  {
    torch::NoGradGuard no_grad;
    for (const std::string& path : state_tree_layers) {
      CAPTURE(path);
      BitLinearImpl& m = bit_at(packed, path);
      CHECK((m.dtype() == dtype_of<T>()));
      CHECK(m.packed<T>()->ternary_weight() == bit_at(source, path).packed<T>()->ternary_weight());
      const torch::Tensor x = torch::randn({2, m.in_features()}, dtype_of<T>());
      const auto expected = hf::load_bit_linear<T>(hf::checkpoint(packed_file), path, m.out_features());
      CHECK(same_bits(m.forward(x), to_tensor(expected.forward(to_matrix<T>(x)))));
    }
  }

  // The same tree as a folder (config.json + model.safetensors), written with the model's own config.
  bitnet::libtorch::save_pretrained(*source, dir / "folder", {}, R"({"model_type": "tiny"})");
  const hf::checkpoint folder(dir / "folder");
  CHECK(folder.is_folder());
  REQUIRE(folder.config_path());
  const auto config = nlohmann::json::parse(std::ifstream(*folder.config_path()));
  CHECK(config["model_type"] == "tiny");
  CHECK(config["quantization_config"]["quantization_mode"] == "online");
  nn::Sequential from_folder = state_tree(8);
  from_folder->to(dtype_of<T>());
  bitnet::libtorch::load_state_dict(*from_folder, dir / "folder");
  CHECK(same_state(state_of(*from_folder), state_of(*source)));
}

TEST_CASE("torch state dict: strict mode names every missing and unexpected key; mismatches name the key") {
  scratch_dir dir;
  nn::Sequential source = state_tree(9);
  const fs::path file = dir / "m.safetensors";
  bitnet::libtorch::save_state_dict(*source, file, {.bit_linear = bit_linear_storage::hf_packed});

  // A tree with one more layer and a differently named one.
  torch::manual_seed(10);
  auto other = nn::Sequential(nn::Linear(8, 16), nn::BatchNorm1d(16), nn::ReLU(), nn::Linear(16, 6), nn::Linear(6, 4),
                              nn::Linear(4, 2));
  bitnet::libtorch::replace_linear(other);
  const auto before = state_of(*other);
  const std::string text = error_text([&] { bitnet::libtorch::load_state_dict(*other, file); });
  CHECK(text.find("missing key \"4.bias\"") != std::string::npos);  // the file's layer 4 has no bias
  CHECK(text.find("missing key \"5.weight\"") != std::string::npos);
  CHECK(text.find("missing key \"5.bias\"") != std::string::npos);
  CHECK(text.find("unchanged") != std::string::npos);
  CHECK(same_state(state_of(*other), before));
  CHECK(!bit_at(other, "0").packed_only());

  // Not strict: the rest loads; the report lists what was left out.
  const bitnet::state_dict_report report = bitnet::libtorch::load_state_dict(*other, file, {.strict = false});
  CHECK((report.missing == std::vector<std::string>{"4.bias", "5.weight", "5.bias"}));
  CHECK(bit_at(other, "3").packed_only());
  CHECK(!bit_at(other, "5").packed_only());

  // Unexpected keys, and shapes / dtypes named by key.
  torch::manual_seed(11);
  auto small = nn::Sequential(nn::Linear(8, 16), nn::BatchNorm1d(16));
  bitnet::libtorch::replace_linear(small);
  const std::string unexpected = error_text([&] { bitnet::libtorch::load_state_dict(*small, file); });
  CHECK(unexpected.find("unexpected key \"3.weight_scale\"") != std::string::npos);
  CHECK(unexpected.find("unexpected key \"4.weight\"") != std::string::npos);

  auto wide = nn::Sequential(nn::Linear(8, 12), nn::BatchNorm1d(16), nn::ReLU(), nn::Linear(16, 6),
                             nn::Linear(nn::LinearOptions(6, 4).bias(false)));
  bitnet::libtorch::replace_linear(wide);
  const std::string shapes = error_text([&] { bitnet::libtorch::load_state_dict(*wide, file); });
  CHECK(shapes.find("size mismatch for \"0.weight\"") != std::string::npos);
  CHECK(shapes.find("size mismatch for \"0.bias\"") != std::string::npos);

  nn::Sequential typed = state_tree(12);
  typed->ptr(1)->as<nn::BatchNorm1dImpl>()->num_batches_tracked.set_data(torch::zeros({}, torch::kInt32));
  const std::string types = error_text([&] { bitnet::libtorch::load_state_dict(*typed, file); });
  CHECK(types.find("size mismatch for \"1.num_batches_tracked\": the file has I64") != std::string::npos);

  // A packed file into a tree that was never converted: the packed layers are named, with the remedy.
  nn::Sequential plain = state_tree(12, /*convert=*/false);
  const std::string unconverted = error_text([&] { bitnet::libtorch::load_state_dict(*plain, file); });
  CHECK(unconverted.find("\"0.weight_scale\": the file stores this layer in the packed BitNet form") !=
        std::string::npos);
  CHECK(unconverted.find("replace_linear") != std::string::npos);

  // The convention is read: a caller who asks for the other one is told both.
  nn::Sequential tree = state_tree(13);
  const std::string convention = error_text([&] {
    bitnet::libtorch::load_state_dict(*tree, file, {.scale_convention = hf::scale_convention::bitlinear});
  });
  CHECK(convention.find("autobitlinear") != std::string::npos);
  CHECK(convention.find("bitlinear\"") != std::string::npos);
}

TEST_CASE("torch state dict: a file that declares a rotation or unit scales is refused, not loaded without them") {
  scratch_dir dir;
  nn::Sequential source = state_tree(16);
  const fs::path good = dir / "good.safetensors";
  bitnet::libtorch::save_state_dict(*source, good, {.bit_linear = bit_linear_storage::hf_packed});
  const st::reader original(good);
  hf::quantization_config declared = *hf::declared_quantization(original);
  declared.rotation = hf::rotation_declaration{8, {}};  // rotates no layer, yet a rotation the module cannot run
  std::vector<st::tensor_spec> specs;
  for (const st::tensor_info& t : original.tensors()) specs.push_back({t.name, t.type, t.shape});
  const fs::path rotated = dir / "rotated.safetensors";
  {
    st::writer out(rotated, specs, {hf::metadata_entry(declared)});
    for (const st::tensor_info& t : original.tensors()) out.write_bytes(t.name, original.read_bytes(t.name));
    out.finish();
  }
  nn::Sequential tree = state_tree(17);
  const auto before = state_of(*tree);
  const std::string text = error_text([&] { bitnet::libtorch::load_state_dict(*tree, rotated); });
  CHECK(text.find("declares rotated layers (bitnet_rotation), which bitnet::libtorch::BitLinear cannot compute") !=
        std::string::npos);
  CHECK(same_state(state_of(*tree), before));

  // A base-3 declaration: refused by name (the loader reads transformers' 2-bit layout).
  hf::quantization_config base3 = *hf::declared_quantization(original);
  base3.storage = bitnet::weight_storage::base3;
  const fs::path base3_file = dir / "base3.safetensors";
  {
    st::writer out(base3_file, specs, {hf::metadata_entry(base3)});
    for (const st::tensor_info& t : original.tensors()) out.write_bytes(t.name, original.read_bytes(t.name));
    out.finish();
  }
  const std::string base3_text = error_text([&] { bitnet::libtorch::load_state_dict(*tree, base3_file); });
  CHECK(base3_text.find("declares bitnet_weight_storage \"base3\" (five codes a byte), which bitnet::libtorch's "
                        "loader does not read") != std::string::npos);
  CHECK(same_state(state_of(*tree), before));
}

TEST_CASE("torch state dict: all or nothing - a corrupt packed code or a NaN latent weight in the last layer "
          "changes nothing") {
  scratch_dir dir;
  nn::Sequential source = state_tree(14);
  const fs::path good = dir / "good.safetensors";
  bitnet::libtorch::save_state_dict(*source, good, {.bit_linear = bit_linear_storage::hf_packed});
  // The same file with one packed byte of the last layer holding code 3 (which pack_weights never writes).
  const hf::checkpoint original(good);
  const auto rewrite = [&](const fs::path& to, const std::string& bad_key, auto&& corrupt) {
    std::vector<st::tensor_spec> specs;
    for (const st::tensor_info* t : original.tensors()) specs.push_back({t->name, t->type, t->shape});
    const auto& metadata = original.shards()[0].metadata();
    st::writer out(to, specs, std::map<std::string, std::string>(metadata.begin(), metadata.end()));
    for (const st::tensor_info* t : original.tensors()) {
      std::vector<std::byte> bytes = original.shard_of(t->name).read_bytes(t->name);
      if (t->name == bad_key) corrupt(bytes);
      out.write_bytes(t->name, bytes);
    }
    out.finish();
  };
  rewrite(dir / "bad_code.safetensors", "4.weight", [](std::vector<std::byte>& b) { b.back() = std::byte{0xFF}; });

  nn::Sequential tree = state_tree(15);
  const auto before = state_of(*tree);
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({3, 8});
  const torch::Tensor output = tree->forward(x);
  const std::string text = error_text([&] { bitnet::libtorch::load_state_dict(*tree, dir / "bad_code.safetensors"); });
  CHECK(text.find("\"4.weight\"") != std::string::npos);
  CHECK(text.find("code 3") != std::string::npos);
  CHECK(same_state(state_of(*tree), before));
  for (const std::string& path : state_tree_layers) CHECK(!bit_at(tree, path).packed_only());
  CHECK(same_bits(tree->forward(x), output));

  // Online: a NaN in the last layer's latent weight.
  bitnet::libtorch::save_state_dict(*source, dir / "online.safetensors");
  const hf::checkpoint online(dir / "online.safetensors");
  {
    std::vector<st::tensor_spec> specs;
    for (const st::tensor_info* t : online.tensors()) specs.push_back({t->name, t->type, t->shape});
    st::writer out(dir / "nan.safetensors", specs);
    for (const st::tensor_info* t : online.tensors()) {
      std::vector<std::byte> bytes = online.shard_of(t->name).read_bytes(t->name);
      if (t->name == "4.weight") {
        const float nan = std::nanf("");
        std::memcpy(bytes.data() + 4, &nan, sizeof nan);
      }
      out.write_bytes(t->name, bytes);
    }
    out.finish();
  }
  const std::string nan_text = error_text([&] { bitnet::libtorch::load_state_dict(*tree, dir / "nan.safetensors"); });
  CHECK(nan_text.find("\"4.weight\"") != std::string::npos);
  CHECK(nan_text.find("not finite") != std::string::npos);
  CHECK(same_state(state_of(*tree), before));
  CHECK(same_bits(tree->forward(x), output));
}

TEST_CASE("torch state dict: folders written by convert_model and files by the graph's save_state_dict load into "
          "a libtorch tree") {
  scratch_dir dir;
  // A dense float model folder (the tree before conversion), then bitnet's converter packs it.
  nn::Sequential dense = state_tree(16, /*convert=*/false);
  bitnet::libtorch::save_pretrained(*dense, dir / "dense", {}, R"({"model_type": "tiny"})");
  CHECK(!hf::checkpoint(dir / "dense").quantization());  // no BitLinear, no quantization_config
  for (const auto convention : {hf::scale_convention::autobitlinear, hf::scale_convention::bitlinear}) {
    CAPTURE(hf::convention_name(convention));
    const fs::path out = dir / (std::string("packed_") + std::string(hf::convention_name(convention)));
    bitnet::convert_model(dir / "dense", out, {.scale_convention = convention});
    nn::Sequential tree = state_tree(17);
    const bitnet::state_dict_report report = bitnet::libtorch::load_state_dict(*tree, out);
    CHECK(report.unexpected.empty());
    for (const std::string& path : state_tree_layers) CHECK(bit_at(tree, path).packed_only());
    const hf::checkpoint converted(out);
    check_layers_match_file(tree, converted);
    // The converter quantized the same float weights as replace_linear does: same codes and scale.
    nn::Sequential converted_here = state_tree(16);
    for (const std::string& path : state_tree_layers) {
      CHECK(bit_at(tree, path).packed<float>()->ternary_weight() ==
            bit_at(converted_here, path).packed<float>()->ternary_weight());
      CHECK(bit_at(tree, path).packed<float>()->weight_scale() == bit_at(converted_here, path).packed<float>()->weight_scale());
    }
  }
  // Online: convert_model's online folder keeps the latent weights; they load bit for bit.
  bitnet::convert_model(dir / "dense", dir / "online", {.mode = hf::quantization_mode::online});
  nn::Sequential online = state_tree(18);
  bitnet::libtorch::load_state_dict(*online, dir / "online");
  CHECK(same_bits(bit_at(online, "3").weight, dense->ptr(3)->as<nn::LinearImpl>()->weight));

  // The graph version's save_state_dict (packed, bitlinear) under a prefix, into the tree's BitLinear modules.
  std::mt19937 rng(19);
  const auto random = [&](Index rows, Index cols) {
    std::normal_distribution<float> normal;
    Matrix<float> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
    return m;
  };
  std::map<std::string, bitnet::BitLinear<float>> graph;
  graph.emplace("0", bitnet::BitLinear<float>(random(16, 8), Vector<float>(random(16, 1))));
  graph.emplace("1", bitnet::BitLinear<float>(random(6, 16), Vector<float>(random(6, 1))));
  bitnet::save_state_dict(graph, dir / "graph.safetensors",
                          {.prefix = "model.", .scale_convention = hf::scale_convention::bitlinear,
                           .bit_linear = bit_linear_storage::hf_packed});
  torch::manual_seed(20);
  auto two = nn::Sequential(nn::Linear(8, 16), nn::Linear(16, 6));
  bitnet::libtorch::replace_linear(two);
  two->eval();
  bitnet::libtorch::load_state_dict(*two, dir / "graph.safetensors", {.prefix = "model."});
  torch::NoGradGuard no_grad;
  for (const char* path : {"0", "1"}) {
    CAPTURE(path);
    auto* m = two->ptr(std::size_t(std::stoi(path)))->as<BitLinearImpl>();
    const torch::Tensor x = torch::randn({2, m->in_features()});
    CHECK(same_bits(m->forward(x), to_tensor(graph.at(path).forward(to_matrix<float>(x)))));
  }
}
#endif
