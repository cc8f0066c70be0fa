// The PyTorch autograd reference vectors of tests/data/training_reference.txt (written by
// tests/data/make_training_reference.py) and unit_training_reference.txt (make_unit_training_reference.py): one case per "case" line, then one line per tensor of
// hex floats. Shared by the per-layer training tests and the libtorch tests.
#pragma once

#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <bitnet/matrix.hpp>

namespace training_reference {

using bitnet::Index;

struct reference_case {
  std::string name, dtype;
  Index batch = 0, in = 0, out = 0;
  bool bias = false, rms = false;
  double eps = 0, lambda = 0;
  std::map<std::string, std::string> keys;  // header keys after lambda (unit_training_reference.txt)
  std::map<std::string, std::vector<double>> tensors;
};

inline std::vector<reference_case> read_reference(const std::string& path) {
  std::ifstream file(path);
  REQUIRE_MESSAGE(file.good(), "cannot open " << path);
  std::vector<reference_case> cases;
  std::string line;
  while (std::getline(file, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream in(line);
    std::string tag;
    in >> tag;
    if (tag == "case") {
      reference_case c;
      std::string key, eps, lambda;
      in >> c.name >> key >> c.dtype >> key >> c.batch >> key >> c.in >> key >> c.out >> key >> c.bias >> key >> c.rms >>
          key >> eps >> key >> lambda;
      c.eps = std::strtod(eps.c_str(), nullptr);
      c.lambda = std::strtod(lambda.c_str(), nullptr);
      for (std::string value; in >> key >> value;) c.keys[key] = value;
      cases.push_back(std::move(c));
    } else if (tag != "end") {
      REQUIRE(!cases.empty());
      std::vector<double>& values = cases.back().tensors[tag];
      std::string word;
      while (in >> word) values.push_back(std::strtod(word.c_str(), nullptr));
    }
  }
  return cases;
}

}  // namespace training_reference
