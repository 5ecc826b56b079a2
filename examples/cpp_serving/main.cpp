// speeder_serve: answer recommendation requests from C++ with an AOTInductor export directory.
//
//   speeder_serve EXPORT_DIR [REQUESTS]      REQUESTS: a file; stdin when omitted or "-"
//
// A request is one line "history ids ; candidate ids" (space-separated item ids, history oldest first); empty
// lines and lines starting with '#' are skipped. Each request prints one line,
//   top=<best candidate id> score=<its score> latency_us=<microseconds spent in Recommender::recommend>
// or "error=<message>" for a bad request. Exit status: 0, 1 if a request failed, 2 if the export did not load.
#include <speeder_rt/runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> parse_ids(const std::string& text) {
  std::istringstream in(text);
  std::vector<int64_t> ids;
  std::string token;
  while (in >> token) {
    size_t used = 0;
    int64_t id = 0;
    try {
      id = std::stoll(token, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != token.size()) throw std::invalid_argument("not an item id: '" + token + "'");
    ids.push_back(id);
  }
  return ids;
}

speeder_rt::Request parse_request(const std::string& line) {
  const size_t split = line.find(';');
  if (split == std::string::npos || line.find(';', split + 1) != std::string::npos) {
    throw std::invalid_argument("expected 'history ids ; candidate ids'");
  }
  return {parse_ids(line.substr(0, split)), parse_ids(line.substr(split + 1))};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: " << argv[0] << " EXPORT_DIR [REQUESTS]\n";
    return 2;
  }
  std::ifstream file;
  if (argc == 3 && std::string(argv[2]) != "-") {
    file.open(argv[2]);
    if (!file) {
      std::cerr << argv[0] << ": cannot read " << argv[2] << "\n";
      return 2;
    }
  }
  std::istream& input = file.is_open() ? file : std::cin;

  std::unique_ptr<speeder_rt::Recommender> rec;
  try {
    rec = std::make_unique<speeder_rt::Recommender>(argv[1]);
  } catch (const std::exception& e) {
    std::cerr << argv[0] << ": " << e.what() << "\n";
    return 2;
  }

  std::cout.precision(9);  // enough digits to round-trip a float
  int failed = 0;
  std::string line;
  while (std::getline(input, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos || line[line.find_first_not_of(" \t")] == '#') continue;
    try {
      const speeder_rt::Request request = parse_request(line);
      const auto start = std::chrono::steady_clock::now();
      const std::vector<float> scores = rec->recommend({request.history}, {request.candidates}).at(0);
      const auto micros =
          std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start).count();
      const size_t best = std::max_element(scores.begin(), scores.end()) - scores.begin();
      std::cout << "top=" << request.candidates[best] << " score=" << scores[best] << " latency_us=" << micros << "\n";
    } catch (const std::exception& e) {  // a bad request (std::invalid_argument) or a failed model run
      std::cout << "error=" << e.what() << "\n";
      ++failed;
    }
  }
  return failed ? 1 : 0;
}
