#include "json.h"

#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace speeder_rt::json {
namespace {

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Value document() {
    Value v = value();
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters");
    return v;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON: " + what + " at byte " + std::to_string(pos_));
  }

  void skip_space() {
    while (pos_ < text_.size() && std::string_view(" \t\n\r").find(text_[pos_]) != std::string_view::npos) ++pos_;
  }

  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    return text_[pos_];
  }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  bool literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Value value() {
    const char c = peek();
    if (c == '{') return object();
    if (c == '[') return array();
    if (c == '"') return Value(string());
    if (literal("true")) return Value(true);
    if (literal("false")) return Value(false);
    if (literal("null")) return Value(nullptr);
    return number();
  }

  Value object() {
    expect('{');
    Value::Object members;
    if (peek() == '}') {
      ++pos_;
      return Value(std::move(members));
    }
    while (true) {
      if (peek() != '"') fail("expected a key");
      std::string key = string();
      expect(':');
      members.emplace_back(std::move(key), value());
      if (peek() == '}') break;
      expect(',');
    }
    ++pos_;
    return Value(std::move(members));
  }

  Value array() {
    expect('[');
    Value::Array items;
    if (peek() == ']') {
      ++pos_;
      return Value(std::move(items));
    }
    while (true) {
      items.push_back(value());
      if (peek() == ']') break;
      expect(',');
    }
    ++pos_;
    return Value(std::move(items));
  }

  Value number() {
    const std::string rest(text_.substr(pos_, 64));
    char* end = nullptr;
    const double v = std::strtod(rest.c_str(), &end);
    if (end == rest.c_str()) fail("unexpected character");
    pos_ += static_cast<size_t>(end - rest.c_str());
    return Value(v);
  }

  unsigned hex4() {
    if (pos_ + 4 > text_.size()) fail("truncated \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated string");
      switch (const char e = text_[pos_++]) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xD800 && code < 0xDC00 && literal("\\u")) {  // a surrogate pair
            const unsigned low = hex4();
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

}  // namespace

bool Value::contains(std::string_view key) const {
  const auto* members = std::get_if<Object>(&data_);
  if (members == nullptr) return false;
  for (const auto& [k, v] : *members) {
    if (k == key) return true;
  }
  return false;
}

const Value& Value::at(std::string_view key) const {
  const auto* members = std::get_if<Object>(&data_);
  if (members == nullptr) throw std::runtime_error("JSON: not an object (looking up '" + std::string(key) + "')");
  for (const auto& [k, v] : *members) {
    if (k == key) return v;
  }
  throw std::runtime_error("JSON: missing key '" + std::string(key) + "'");
}

int64_t Value::as_int() const {
  const auto* v = std::get_if<double>(&data_);
  if (v == nullptr || std::trunc(*v) != *v) throw std::runtime_error("JSON: not an integer");
  return static_cast<int64_t>(*v);
}

const std::string& Value::as_string() const {
  const auto* v = std::get_if<std::string>(&data_);
  if (v == nullptr) throw std::runtime_error("JSON: not a string");
  return *v;
}

const Value::Array& Value::as_array() const {
  const auto* v = std::get_if<Array>(&data_);
  if (v == nullptr) throw std::runtime_error("JSON: not an array");
  return *v;
}

Value parse(std::string_view text) {
  return Parser(text).document();
}

}  // namespace speeder_rt::json
