// bitnet/verify.hpp - how much a model's outputs changed when its layers became BitLinear.
//
//   auto before = bitnet::record_outputs(model, forward, probes);   // forward(model, x) -> Matrix<T>
//   bitnet::replace_linear(model);
//   bitnet::output_difference d = bitnet::compare_outputs(before, model, forward);
//
// forward is the user's own function that runs the model; the probes are inputs of the user's choice.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/validate.hpp"
#include "errors.hpp"
#include "matrix.hpp"

namespace bitnet {

/// Agreement of two sets of outputs, over all their values together.
struct output_difference {
  double max_abs_error = 0;      // max |after - before|
  double relative_error = 0;     // ||after - before|| / ||before|| (Frobenius; 0 if both are 0)
  double cosine_similarity = 1;  // <before, after> / (||before|| ||after||); 1 if both are 0, 0 if one is
  Index values = 0;              // how many values were compared

  std::string to_string() const {
    char text[160];
    std::snprintf(text, sizeof text, "max abs error %.6g, relative error %.6g, cosine similarity %.6f (%lld values)",
                  max_abs_error, relative_error, cosine_similarity, static_cast<long long>(values));
    return text;
  }
};

inline std::ostream& operator<<(std::ostream& out, const output_difference& d) { return out << d.to_string(); }

namespace detail {

struct difference_sums {
  double max_abs = 0, diff_squares = 0, before_squares = 0, after_squares = 0, dot = 0;
  Index values = 0;

  template <class T>
  void add(const Matrix<T>& before, const Matrix<T>& after, const std::string& what) {
    if (before.rows() != after.rows() || before.cols() != after.cols())
      throw shape_error("compare_outputs: " + what + ": the output is " + shape_string(after.rows(), after.cols()) +
                        ", the reference is " + shape_string(before.rows(), before.cols()));
    require_finite(before, "compare_outputs: " + what + ": reference output");
    require_finite(after, "compare_outputs: " + what + ": output");
    for (Index i = 0; i < before.size(); ++i) {
      const double b = double(before.data()[i]), a = double(after.data()[i]);
      max_abs = std::max(max_abs, std::abs(a - b));
      diff_squares += (a - b) * (a - b);
      before_squares += b * b;
      after_squares += a * a;
      dot += a * b;
    }
    values += before.size();
  }

  output_difference result() const {
    output_difference d;
    d.max_abs_error = max_abs;
    d.values = values;
    d.relative_error = before_squares > 0 ? std::sqrt(diff_squares / before_squares) : (diff_squares > 0 ? INFINITY : 0);
    if (before_squares == 0 && after_squares == 0)
      d.cosine_similarity = 1;
    else if (before_squares == 0 || after_squares == 0)
      d.cosine_similarity = 0;
    else
      d.cosine_similarity = dot / (std::sqrt(before_squares) * std::sqrt(after_squares));
    return d;
  }
};

}  // namespace detail

/// Compares one output against its reference. Throws shape_error for different shapes and
/// value_error for a non-finite value.
template <real_scalar T>
output_difference compare_outputs(const Matrix<T>& before, const Matrix<T>& after) {
  detail::difference_sums sums;
  sums.add(before, after, "output");
  return sums.result();
}

/// The probe inputs and the model's outputs on them, taken before the model changes.
template <real_scalar T>
struct output_snapshot {
  std::vector<Matrix<T>> probes;
  std::vector<Matrix<T>> outputs;
};

/// Runs forward(model, probe) on each probe and keeps inputs and outputs.
template <class Model, class Forward, real_scalar T>
output_snapshot<T> record_outputs(Model& model, Forward&& forward, std::vector<Matrix<T>> probes) {
  if (probes.empty()) throw shape_error("record_outputs: no probe inputs");
  output_snapshot<T> snapshot;
  snapshot.outputs.reserve(probes.size());
  for (const auto& probe : probes) snapshot.outputs.push_back(Matrix<T>(forward(model, probe)));
  snapshot.probes = std::move(probes);
  return snapshot;
}

/// Runs forward(model, probe) again on the snapshot's probes and compares with the recorded outputs.
template <class Model, class Forward, real_scalar T>
output_difference compare_outputs(const output_snapshot<T>& before, Model& model, Forward&& forward) {
  detail::difference_sums sums;
  for (std::size_t i = 0; i < before.probes.size(); ++i)
    sums.add(before.outputs[i], Matrix<T>(forward(model, before.probes[i])), "probe " + std::to_string(i));
  return sums.result();
}

}  // namespace bitnet
