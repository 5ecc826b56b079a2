// speeder_serve: answer recommendation requests from C++ with an AOTInductor export directory.
//
//   speeder_serve EXPORT_DIR [REQUESTS]      REQUESTS: a file; stdin when omitted or "-"
//
// A request is one line "history ids ; candidate ids" (space-separated item ids, history oldest first); empty
// lines and lines starting with '#' are skipped. Item ids are plain decimal integers ("+3", "3.0", "0x3" and
// numbers beyond int64 are refused). Each request prints one line,
//   top=<best candidate id> score=<its score> latency_us=<microseconds spent in Recommender::recommend>
// or "error=<message>" for a bad request. Exit status: 0, 1 if a request failed, 2 if the export did not load.
#include <speeder_rt/runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

// One request per line. Item ids are plain decimal integers that fit int64 (speeder_rt::parse_item_ids); the fields
// named in errors are those of the one-user batch the line is served as, so a line gets the message that the same
// request gets from every runtime (e.g. "history_ids[0]: item ids must be integers, got "+3"").
speeder_rt::Request parse_request(const std::string& line, int64_t num_items) {
  const size_t split = line.find(';');
  if (split == std::string::npos || line.find(';', split + 1) != std::string::npos) {
    throw std::invalid_argument("expected 'history ids ; candidate ids'");
  }
  const std::string_view text(line);
  return {speeder_rt::parse_item_ids(text.substr(0, split), "history_ids[0]", num_items),
          speeder_rt::parse_item_ids(text.substr(split + 1), "candidate_ids[0]", num_items)};
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
      const speeder_rt::Request request = parse_request(line, rec->info().num_items);
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
