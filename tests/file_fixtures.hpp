// Scratch folders and file-system snapshots for the tests of what writes files (the converter):
// a refusal must leave every path as it was.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>

namespace file_fixtures {

namespace fs = std::filesystem;

/// A fresh folder under the system's temporary folder, removed with everything in it.
struct scratch_dir {
  fs::path path;
  explicit scratch_dir(const std::string& prefix) {
    std::random_device rd;
    path = fs::temp_directory_path() / (prefix + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

inline void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

inline std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

/// Every path under `root` (links as links), with a file's content: what a run changed.
inline std::map<std::string, std::string> tree_of(const fs::path& root) {
  std::map<std::string, std::string> tree;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it) {
    const std::string rel = fs::relative(it->path(), root).generic_string();
    if (it->is_symlink()) tree[rel] = "-> " + fs::read_symlink(it->path()).string();
    else if (it->is_directory()) tree[rel] = "/";
    else tree[rel] = read_text(it->path());
  }
  return tree;
}

}  // namespace file_fixtures
