// An export's item-token table, as speeder_rt/export/items.py writes it (docs/export.md, "The item table"):
//   items/current.json             {"format_version": 1, "version": V, "num_items": N, "dim": D, "dtype": "float32",
//                                   "file": "v00000V/item_tokens.npy", "sha256": "..."}
//   items/v00000V/item_tokens.npy  [N, D], float32 or float16, C order, little-endian
// current.json is read once, then only the file it names (a writer replaces it only after the file is complete).
// Internal to the runtime. The sha256 is not checked here (the Python readers check it); shape, dtype and every
// value are.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <string>

namespace speeder_rt::items {

// items/current.json's version; std::invalid_argument naming the file when it is missing or malformed.
int64_t current_version(const std::filesystem::path& export_dir);

struct Table {
  int64_t version = 0;
  std::string file;   // the .npy read
  at::Tensor tokens;  // CPU [num_items, dim], the stored dtype (float32 or float16)
};

// The current version, checked: the pointer's fields, the file's .npy header against them, every value finite.
// std::invalid_argument naming the file (and for a NaN or an infinity the row and column).
Table read_current(const std::filesystem::path& export_dir);

}  // namespace speeder_rt::items
