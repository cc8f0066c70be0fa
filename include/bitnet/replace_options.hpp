// bitnet/replace_options.hpp - which layers replace_linear converts, and how.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bit_linear.hpp"
#include "matrix.hpp"

namespace bitnet {

/// A rule that keeps matching layers as they are, like Hugging Face's modules_to_not_convert.
class exclude_rule {
 public:
  enum class match {
    components,  // the pattern appears as whole dotted components: "lm_head" matches "lm_head" and
                 // "model.lm_head", "mlp" matches "blocks.0.mlp.up", but "head" matches neither
    exact,       // the whole path equals the pattern
    prefix,      // the path is the pattern or lies below it: "blocks.0" matches "blocks.0.mlp.up", not "blocks.01"
    contains,    // the pattern is a substring of the path
  };

  /// The default rule from a plain string: whole dotted components (see match::components).
  exclude_rule(std::string pattern) : pattern_(std::move(pattern)), kind_(match::components) {}
  exclude_rule(const char* pattern) : exclude_rule(std::string(pattern)) {}
  exclude_rule(std::string pattern, match kind) : pattern_(std::move(pattern)), kind_(kind) {}

  static exclude_rule exact(std::string pattern) { return {std::move(pattern), match::exact}; }
  static exclude_rule prefix(std::string pattern) { return {std::move(pattern), match::prefix}; }
  static exclude_rule contains(std::string pattern) { return {std::move(pattern), match::contains}; }

  const std::string& pattern() const noexcept { return pattern_; }
  match kind() const noexcept { return kind_; }

  bool matches(std::string_view path) const noexcept {
    const std::string_view p = pattern_;
    switch (kind_) {
      case match::exact:
        return path == p;
      case match::prefix:
        return path == p || (path.size() > p.size() && path.substr(0, p.size()) == p && path[p.size()] == '.');
      case match::contains:
        return path.find(p) != std::string_view::npos;
      case match::components:
        break;
    }
    if (p.empty()) return false;
    for (std::size_t at = path.find(p); at != std::string_view::npos; at = path.find(p, at + 1)) {
      const bool starts = at == 0 || path[at - 1] == '.';
      const bool ends = at + p.size() == path.size() || path[at + p.size()] == '.';
      if (starts && ends) return true;
    }
    return false;
  }

  /// e.g. `prefix "blocks.0"`, for reports.
  std::string describe() const {
    const char* names[] = {"components", "exact", "prefix", "contains"};
    return std::string(names[int(kind_)]) + " \"" + pattern_ + "\"";
  }

 private:
  std::string pattern_;
  match kind_;
};

/// What a predicate sees of a linear layer.
struct linear_info {
  Index in_features = 0;
  Index out_features = 0;
  bool has_bias = false;
};

/// How replace_linear gives the new layers their ternary weights.
enum class ternary_import {
  quantize,  // absmean quantization of the source weights per unit of layer_options.weight_scales (b1.58)
  exact,     // the source weights are already ternary per unit (every nonzero |w| of a row / group equal,
             // as Ternary Bonsai's unpacked FP16 / BF16 folders): codes and scales read off with no
             // rounding (BitLinear::from_exact_ternary); any other layer is refused, naming it, its row and
             // group. Needs per_row or per_group scales; the new layers hold no latent weights and
             // are weight_scale_update::frozen (fine-tuning keeps the imported scales).
};

struct replace_options {
  /// Layers matching any rule are kept as they are (and need no BitLinear slot).
  std::vector<exclude_rule> exclude;
  /// Called for each layer no rule excluded; return false to keep it as it is.
  std::function<bool(std::string_view path, const linear_info& layer)> predicate;
  /// The options every new BitLinear is built with (unless layer_options_for is set).
  bitlinear_options layer_options;
  /// Per-layer options: when set, called once for each layer that will be converted (after the
  /// exclude rules and the predicate, in graph order) with its path and shape; that layer is built
  /// with what it returns instead of layer_options. The way to give layers of different input
  /// widths their own rotation (a rotated model's signs are per width) or their own group size.
  /// A rotation whose width is not the layer's in_features, or any bitnet::error it throws, aborts
  /// the whole replacement before anything changes (transfer_error naming the layer).
  std::function<bitlinear_options(std::string_view path, const linear_info& layer)> layer_options_for;
  /// Quantize the source weights (the default) or import them exactly (see ternary_import).
  ternary_import weights = ternary_import::quantize;
  /// Build and check every new layer, report, then discard them: the graph is not changed.
  bool dry_run = false;
};

}  // namespace bitnet
