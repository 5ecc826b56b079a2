// A reader for the header of a .npy file (NumPy's format, versions 1-3), what speeder_rt's item tables are stored
// in: little-endian float32 / float16, C order. Internal to the runtime; no dependency beyond the standard library.
#pragma once

#include <cstdint>
#include <istream>
#include <string>
#include <vector>

namespace speeder_rt::npy {

struct Header {
  std::string dtype;           // "float32" ('<f4') or "float16" ('<f2')
  std::vector<int64_t> shape;  // C order
  int64_t item_size = 0;       // bytes per value
};

// Reads the magic string and the header dictionary of `in`, which is left at the first data byte. Anything but a
// C-order '<f4' / '<f2' array (another dtype, fortran_order True, a malformed or truncated header) throws
// std::invalid_argument naming `file` and what is wrong.
Header read_header(std::istream& in, const std::string& file);

}  // namespace speeder_rt::npy
