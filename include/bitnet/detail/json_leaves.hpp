// Reads the few values bitnet needs from a JSON document (config.json, an index.json, a
// quantization_config string) without building an nlohmann::json tree: a SAX pass hands every
// scalar to a callback with its key path. ~basic_json allocates while freeing a non-empty tree,
// so a std::bad_alloc there could reach a noexcept destructor; nothing here does.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "../errors.hpp"

namespace bitnet::detail {

/// One scalar of a JSON document. Array elements have the path component "[]".
struct json_leaf {
  const std::vector<std::string>& path;
  std::variant<std::nullptr_t, bool, std::int64_t, std::uint64_t, double, std::string> value;
};

/// What a container at `path` is, for callers that must tell an object from a scalar.
enum class json_container { object, array };

template <class OnLeaf, class OnContainer>
class json_leaf_parser {
 public:
  using json = nlohmann::json;
  json_leaf_parser(OnLeaf& on_leaf, OnContainer& on_container) : on_leaf_(on_leaf), on_container_(on_container) {}

  bool null() { return leaf(nullptr); }
  bool boolean(bool value) { return leaf(value); }
  bool number_integer(json::number_integer_t value) { return leaf(std::int64_t(value)); }
  bool number_unsigned(json::number_unsigned_t value) { return leaf(std::uint64_t(value)); }
  bool number_float(json::number_float_t value, const json::string_t&) { return leaf(double(value)); }
  bool string(json::string_t& value) { return leaf(std::string(value)); }
  bool binary(json::binary_t&) { return leaf(nullptr); }  // never called for JSON text
  bool start_object(std::size_t) {
    on_container_(std::as_const(path_), json_container::object);
    path_.emplace_back();
    return true;
  }
  bool end_object() {
    path_.pop_back();
    return true;
  }
  bool start_array(std::size_t) {
    on_container_(std::as_const(path_), json_container::array);
    path_.emplace_back("[]");
    return true;
  }
  bool end_array() {
    path_.pop_back();
    return true;
  }
  bool key(json::string_t& key) {
    path_.back() = key;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    error = e.what();
    return false;
  }

  std::optional<std::string> error;

 private:
  template <class V>
  bool leaf(V&& value) {
    on_leaf_(json_leaf{path_, std::forward<V>(value)});
    return true;
  }
  OnLeaf& on_leaf_;
  OnContainer& on_container_;
  std::vector<std::string> path_;
};

/// Parses `text` and calls on_leaf(json_leaf) for every scalar and on_container(path, kind) for
/// every object or array. Throws io_error naming `source` for malformed JSON.
template <class OnLeaf, class OnContainer>
void parse_json_leaves(std::string_view text, std::string_view source, OnLeaf&& on_leaf, OnContainer&& on_container) {
  json_leaf_parser<std::remove_reference_t<OnLeaf>, std::remove_reference_t<OnContainer>> parser(on_leaf,
                                                                                                  on_container);
  const bool ok = nlohmann::json::sax_parse(text.begin(), text.end(), &parser);
  if (!ok || parser.error)
    throw io_error(std::string(source) + ": invalid JSON: " + (parser.error ? *parser.error : std::string("parse error")));
}

}  // namespace bitnet::detail
