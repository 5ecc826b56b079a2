#include "npy.h"

#include <cctype>
#include <cstring>
#include <stdexcept>
#include <string_view>

namespace speeder_rt::npy {
namespace {

// The header is a Python dict literal, e.g. "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", padded
// with spaces to a multiple of 64 bytes and ended by '\n'.
class DictParser {
 public:
  DictParser(std::string_view text, const std::string& file) : text_(text), file_(file) {}

  Header parse() {
    Header header;
    bool has_descr = false, has_order = false, has_shape = false;
    expect('{');
    while (!peek('}')) {
      const std::string key = quoted();
      expect(':');
      if (key == "descr") {
        const std::string descr = quoted();
        if (descr == "<f4" || descr == "<f2") {
          header.dtype = descr == "<f4" ? "float32" : "float16";
          header.item_size = descr == "<f4" ? 4 : 2;
        } else {
          fail("dtype '" + descr + "'; an item table is little-endian float32 ('<f4') or float16 ('<f2')");
        }
        has_descr = true;
      } else if (key == "fortran_order") {
        if (word() != "False") fail("fortran_order is not False; an item table is stored in C order");
        has_order = true;
      } else if (key == "shape") {
        expect('(');
        while (!peek(')')) {
          header.shape.push_back(integer());
          if (!peek(')')) expect(',');
        }
        expect(')');
        has_shape = true;
      } else {
        fail("unknown header key '" + key + "'");
      }
      if (!peek('}')) expect(',');
    }
    if (!has_descr || !has_order || !has_shape) fail("header lacks descr, fortran_order or shape");
    return header;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument(file_ + ": not a plain .npy item table (" + what + ")");
  }
  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  bool peek(char c) {
    skip_space();
    return pos_ < text_.size() && text_[pos_] == c;
  }
  void expect(char c) {
    if (!peek(c)) fail(std::string("malformed header: expected '") + c + "' at byte " + std::to_string(pos_));
    ++pos_;
  }
  std::string quoted() {
    expect('\'');
    const size_t end = text_.find('\'', pos_);
    if (end == std::string_view::npos) fail("malformed header: unterminated string");
    const std::string out(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return out;
  }
  std::string word() {
    skip_space();
    const size_t start = pos_;
    while (pos_ < text_.size() && std::isalpha(static_cast<unsigned char>(text_[pos_]))) ++pos_;
    return std::string(text_.substr(start, pos_ - start));
  }
  int64_t integer() {
    skip_space();
    int64_t value = 0;
    const size_t start = pos_;
    while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_])) && pos_ - start < 18) {
      value = value * 10 + (text_[pos_++] - '0');
    }
    if (pos_ == start) fail("malformed header: expected a dimension at byte " + std::to_string(pos_));
    return value;
  }

  std::string_view text_;
  const std::string& file_;
  size_t pos_ = 0;
};

}  // namespace

Header read_header(std::istream& in, const std::string& file) {
  char magic[8];  // "\x93NUMPY", major, minor
  if (!in.read(magic, sizeof magic) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    throw std::invalid_argument(file + ": not a .npy file (no \\x93NUMPY magic string)");
  }
  const int major = static_cast<unsigned char>(magic[6]);
  if (major < 1 || major > 3) throw std::invalid_argument(file + ": .npy format version " + std::to_string(major) +
                                                          " (1, 2 or 3 are read)");
  unsigned char size_bytes[4] = {0, 0, 0, 0};  // little-endian: 2 bytes in version 1, 4 after
  in.read(reinterpret_cast<char*>(size_bytes), major == 1 ? 2 : 4);
  const uint32_t size = size_bytes[0] | size_bytes[1] << 8 | size_bytes[2] << 16 | uint32_t{size_bytes[3]} << 24;
  constexpr uint32_t kMaxHeader = 1 << 16;  // numpy writes a few hundred bytes
  if (size > kMaxHeader) throw std::invalid_argument(file + ": .npy header of " + std::to_string(size) + " bytes");
  std::string text(size, '\0');
  if (!in || !in.read(text.data(), size)) throw std::invalid_argument(file + ": truncated .npy header");
  return DictParser(text, file).parse();
}

}  // namespace speeder_rt::npy
