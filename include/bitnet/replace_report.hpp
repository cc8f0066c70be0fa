// bitnet/replace_report.hpp - what replace_linear did (or, in a dry run, would do), layer by layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include "bit_linear.hpp"
#include "matrix.hpp"

namespace bitnet {

/// One replaced (or, in a dry run, replaceable) layer.
struct layer_report {
  std::string path;             // dotted path, e.g. "blocks.3.mlp.down"
  Index in_features = 0;
  Index out_features = 0;
  bool has_bias = false;
  double weight_scale = 0;          // sw: weight ~ ternary / sw (per_tensor layers; 0 for unit scales)
  std::string scales = "tensor";    // one scale per "tensor", per "row", or per group: "g128"
  double zero_fraction = 0;         // fraction of ternary weights that are 0
  double reconstruction_error = 0;  // ||W - ternary / sw||_F / ||W||_F (ternary * d for unit scales; 0 for
                                    // a layer without latent weights: an exact import)
  std::size_t latent_bytes = 0;     // the latent (full-precision) weights the BitLinear keeps
  std::size_t packed_bytes = 0;     // the same weights packed as 2-bit ternary codes
};

/// A linear layer left as it was, and why.
struct kept_layer {
  std::string path;
  std::string reason;  // e.g. "excluded by \"lm_head\"" or "rejected by the predicate"
};

struct replace_report {
  std::vector<layer_report> layers;  // in graph order
  std::vector<kept_layer> kept;
  bool dry_run = false;

  std::size_t total_latent_bytes() const noexcept {
    std::size_t total = 0;
    for (const auto& layer : layers) total += layer.latent_bytes;
    return total;
  }
  std::size_t total_packed_bytes() const noexcept {
    std::size_t total = 0;
    for (const auto& layer : layers) total += layer.packed_bytes;
    return total;
  }
  std::size_t total_weights() const noexcept {
    std::size_t total = 0;
    for (const auto& layer : layers) total += std::size_t(layer.in_features) * std::size_t(layer.out_features);
    return total;
  }

  /// An aligned table: one row per layer, then totals and the kept layers.
  std::string to_string() const;
};

/// The report row of a built BitLinear.
template <real_scalar T>
layer_report describe_layer(std::string path, const BitLinear<T>& layer) {
  layer_report row;
  row.path = std::move(path);
  row.in_features = layer.in_features();
  row.out_features = layer.out_features();
  row.has_bias = layer.bias().has_value();
  const auto& codes = layer.ternary_weight();
  const Matrix<T> reconstructed_weight = layer.dequantized_weight();
  switch (layer.options().weight_scales) {
    case weight_scaling::per_tensor: row.weight_scale = double(layer.weight_scale()); break;
    case weight_scaling::per_row: row.scales = "row"; break;
    case weight_scaling::per_group: row.scales = "g" + std::to_string(layer.options().group_size); break;
  }
  const Matrix<T>& weight = layer.has_latent_weights() ? layer.weight() : reconstructed_weight;
  double zeros = 0, error_squares = 0, weight_squares = 0;
  for (Index r = 0; r < codes.rows(); ++r)
    for (Index c = 0; c < codes.cols(); ++c) {
      const double w = double(weight(r, c));
      const double reconstructed =
          row.weight_scale != 0 ? double(codes(r, c)) / row.weight_scale : double(reconstructed_weight(r, c));
      zeros += codes(r, c) == 0;
      error_squares += (w - reconstructed) * (w - reconstructed);
      weight_squares += w * w;
    }
  row.zero_fraction = zeros / double(codes.size());
  row.reconstruction_error = weight_squares > 0 ? std::sqrt(error_squares / weight_squares) : 0.0;
  row.latent_bytes = std::size_t(codes.size()) * sizeof(T);
  row.packed_bytes = layer.packed_bytes();  // codes as forward() reads them (either storage), padding included
  return row;
}

namespace detail {

inline std::string human_bytes(std::size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = double(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.1f %s", value, units[unit]);
  return text;
}

inline std::string format_row(const std::vector<std::string>& cells, const std::vector<std::size_t>& widths) {
  std::string line;
  for (std::size_t i = 0; i < cells.size(); ++i) {
    const std::size_t pad = widths[i] - cells[i].size();
    if (i == 0)
      line += cells[i] + std::string(pad, ' ');  // the path is left-aligned
    else
      line += "  " + std::string(pad, ' ') + cells[i];
  }
  while (!line.empty() && line.back() == ' ') line.pop_back();
  return line + "\n";
}

inline std::string format_number(const char* format, double value) {
  std::string text(std::size_t(std::snprintf(nullptr, 0, format, value)), '\0');
  std::snprintf(text.data(), text.size() + 1, format, value);
  return text;
}

}  // namespace detail

inline std::string replace_report::to_string() const {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"layer", "in x out", "bias", "scale", "zeros", "recon.err", "latent", "packed"});
  for (const auto& l : layers)
    rows.push_back({l.path, std::to_string(l.in_features) + "x" + std::to_string(l.out_features),
                    l.has_bias ? "yes" : "no",
                    l.scales == "tensor" ? detail::format_number("%.4g", l.weight_scale) : "per " + l.scales,
                    detail::format_number("%.1f%%", 100 * l.zero_fraction),
                    detail::format_number("%.4f", l.reconstruction_error), detail::human_bytes(l.latent_bytes),
                    detail::human_bytes(l.packed_bytes)});
  const std::size_t latent = total_latent_bytes(), packed = total_packed_bytes();
  rows.push_back({"total (" + std::to_string(layers.size()) + (layers.size() == 1 ? " layer)" : " layers)"), "", "",
                  "", "", "", detail::human_bytes(latent), detail::human_bytes(packed)});

  std::vector<std::size_t> widths(rows.front().size(), 0);
  for (const auto& row : rows)
    for (std::size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());

  std::string text;
  if (dry_run) text += "dry run: nothing was changed; these layers would be replaced\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (i + 1 == rows.size()) {
      std::size_t rule = 0;
      for (std::size_t w : widths) rule += w + 2;
      text += std::string(rule - 2, '-') + "\n";
    }
    text += detail::format_row(rows[i], widths);
  }
  if (packed > 0)
    text += detail::format_number("packed weights are %.1fx smaller than the latent weights\n",
                                  double(latent) / double(packed));
  for (const auto& k : kept) text += "kept " + k.path + ": " + k.reason + "\n";
  return text;
}

inline std::ostream& operator<<(std::ostream& out, const replace_report& report) {
  return out << report.to_string();
}

}  // namespace bitnet
