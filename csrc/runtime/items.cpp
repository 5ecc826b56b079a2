#include "items.h"

#include "json.h"
#include "npy.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace speeder_rt::items {
namespace {

namespace fs = std::filesystem;

// speeder_rt.export.items
constexpr int64_t kFormatVersion = 1;  // ITEMS_FORMAT_VERSION
constexpr const char* kItemsDir = "items";
constexpr const char* kCurrentJson = "current.json";
constexpr const char* kTokensFile = "item_tokens.npy";

struct Pointer {
  int64_t version = 0;
  int64_t num_items = 0;
  int64_t dim = 0;
  std::string dtype;
  std::string file;
};

std::string shape_text(int64_t rows, int64_t cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

Pointer read_pointer(const fs::path& export_dir) {
  const fs::path path = export_dir / kItemsDir / kCurrentJson;
  const std::string where = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument(where + ": missing (an export written before item tables were versioned: "
                                               "re-export it)");
  std::ostringstream text;
  text << in.rdbuf();
  json::Value value;
  try {
    value = json::parse(text.str());
  } catch (const std::runtime_error& e) {
    throw std::invalid_argument(where + ": " + e.what());
  }
  const auto field = [&](const char* key, auto read) {
    try {
      return read(value.at(key));
    } catch (const std::runtime_error& e) {
      throw std::invalid_argument(where + ": field '" + key + "': " + e.what());
    }
  };
  const auto integer = [](const json::Value& v) { return v.as_int(); };
  const auto string = [](const json::Value& v) { return v.as_string(); };
  const int64_t format_version = field("format_version", integer);
  if (format_version != kFormatVersion) {
    throw std::invalid_argument(where + ": unknown format_version " + std::to_string(format_version));
  }
  Pointer pointer{field("version", integer), field("num_items", integer), field("dim", integer),
                  field("dtype", string), field("file", string)};
  if (pointer.dtype != "float32" && pointer.dtype != "float16") {
    throw std::invalid_argument(where + ": dtype '" + pointer.dtype + "' is not one of ['float32', 'float16']");
  }
  char version_dir[32];
  std::snprintf(version_dir, sizeof version_dir, "v%06lld", static_cast<long long>(pointer.version));
  if (pointer.file != std::string(version_dir) + "/" + kTokensFile) {
    throw std::invalid_argument(where + ": file '" + pointer.file + "' is not version " +
                                std::to_string(pointer.version) + "'s " + version_dir + "/" + kTokensFile);
  }
  return pointer;
}

// A float16's value for a message: only non-finite ones are shown (exponent bits all set).
bool half_finite(uint16_t bits) { return (bits & 0x7C00) != 0x7C00; }
const char* half_shown(uint16_t bits) { return (bits & 0x03FF) ? "nan" : (bits & 0x8000) ? "-inf" : "inf"; }
const char* float_shown(float value) { return std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf"; }

// The first NaN or infinity in row order names its row and column (speeder_rt.export.items.check_finite).
void check_finite(const at::Tensor& tokens, const std::string& where) {
  const int64_t count = tokens.numel(), dim = tokens.size(1);
  const auto refuse = [&](int64_t i, const char* shown) {
    throw std::invalid_argument(where + ": item token row " + std::to_string(i / dim) + ", column " +
                                std::to_string(i % dim) + " is " + shown + " (tokens must be finite)");
  };
  if (tokens.scalar_type() == at::kFloat) {
    const float* p = tokens.const_data_ptr<float>();
    for (int64_t i = 0; i < count; ++i) {
      if (!std::isfinite(p[i])) refuse(i, float_shown(p[i]));
    }
  } else {
    const auto* p = static_cast<const uint16_t*>(tokens.const_data_ptr());
    for (int64_t i = 0; i < count; ++i) {
      if (!half_finite(p[i])) refuse(i, half_shown(p[i]));
    }
  }
}

}  // namespace

int64_t current_version(const fs::path& export_dir) {
  return read_pointer(export_dir).version;
}

Table read_current(const fs::path& export_dir) {
  const Pointer pointer = read_pointer(export_dir);
  const fs::path path = export_dir / kItemsDir / pointer.file;
  const std::string where = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument(where + ": missing (named by " + kCurrentJson + ")");
  const npy::Header header = npy::read_header(in, where);
  if (header.shape.size() != 2 || header.shape[0] != pointer.num_items || header.shape[1] != pointer.dim ||
      header.dtype != pointer.dtype) {
    std::string shape = "[";
    for (size_t i = 0; i < header.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(header.shape[i]);
    throw std::invalid_argument(where + ": shape " + shape + "] / dtype " + header.dtype + " disagree with " +
                                kCurrentJson + " (" + shape_text(pointer.num_items, pointer.dim) + " / " +
                                pointer.dtype + ")");
  }
  const int64_t bytes = pointer.num_items * pointer.dim * header.item_size;
  const int64_t stored = static_cast<int64_t>(fs::file_size(path)) - static_cast<int64_t>(in.tellg());
  if (stored != bytes) {
    throw std::invalid_argument(where + ": " + std::to_string(stored) + " data bytes where " +
                                shape_text(pointer.num_items, pointer.dim) + " " + pointer.dtype + " needs " +
                                std::to_string(bytes));
  }
  at::Tensor tokens = at::empty({pointer.num_items, pointer.dim}, pointer.dtype == "float32" ? at::kFloat : at::kHalf);
  if (!in.read(static_cast<char*>(tokens.mutable_data_ptr()), bytes)) {
    throw std::runtime_error(where + ": cannot be read");
  }
  check_finite(tokens, where);
  return {pointer.version, where, tokens};
}

}  // namespace speeder_rt::items
