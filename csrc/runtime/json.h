// A small JSON reader for export.json (RFC 8259 values; numbers as double). Internal to the runtime.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace speeder_rt::json {

class Value {
 public:
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;  // in file order; keys are looked up linearly
  using Data = std::variant<std::nullptr_t, bool, double, std::string, Array, Object>;

  Value() = default;
  explicit Value(Data data) : data_(std::move(data)) {}

  bool contains(std::string_view key) const;
  const Value& at(std::string_view key) const;  // std::runtime_error when not an object or the key is missing
  int64_t as_int() const;                       // std::runtime_error unless an integral number
  const std::string& as_string() const;
  const Array& as_array() const;                // std::runtime_error unless an array
  bool is_null() const { return std::holds_alternative<std::nullptr_t>(data_); }

 private:
  Data data_;
};

Value parse(std::string_view text);  // std::runtime_error with the byte offset on malformed input

}  // namespace speeder_rt::json
