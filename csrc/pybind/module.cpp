// speeder_rt._C: the Python module of the extension. It binds the C++ runtime's Recommender (speeder_rt.runtime.cpp
// wraps it).
// Calls release the GIL. speeder_rt::RequestError arrives in Python as speeder_rt.runtime.validation.RequestError
// (field, reason) and speeder_rt::ModelOutputError as validation.ModelOutputError, the exceptions of every Python
// runtime; any other std::invalid_argument as ValueError.
#include "speeder_rt/runtime.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using speeder_rt::ExportInfo;
using speeder_rt::IdRows;
using speeder_rt::Recommender;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "speeder_rt C++ extension: the C++ Recommender";

  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const speeder_rt::RequestError& e) {
      const py::object type = py::module_::import("speeder_rt.runtime.validation").attr("RequestError");
      PyErr_SetObject(type.ptr(), type(e.field(), e.reason()).ptr());
    } catch (const speeder_rt::ModelOutputError& e) {
      const py::object type = py::module_::import("speeder_rt.runtime.validation").attr("ModelOutputError");
      PyErr_SetObject(type.ptr(), type(e.what()).ptr());
    }
  });

  py::class_<ExportInfo>(m, "ExportInfo")
      .def_readonly("directory", &ExportInfo::directory)
      .def_readonly("engine", &ExportInfo::engine)
      .def_readonly("device", &ExportInfo::device)
      .def_readonly("dtype", &ExportInfo::dtype)
      .def_readonly("num_items", &ExportInfo::num_items)
      .def_readonly("items_version", &ExportInfo::items_version)
      .def_readonly("max_batch", &ExportInfo::max_batch)
      .def_readonly("max_history", &ExportInfo::max_history)
      .def_readonly("max_candidates", &ExportInfo::max_candidates)
      .def_readonly("topk", &ExportInfo::topk);

  py::class_<Recommender>(m, "Recommender")
      .def(py::init([](const std::string& export_dir, std::size_t num_runners) {
             return std::make_unique<Recommender>(export_dir, speeder_rt::Options{num_runners});
           }),
           py::arg("export_dir"), py::arg("num_runners") = 1, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("info", &Recommender::info)
      .def("reload_items", &Recommender::reload_items, py::call_guard<py::gil_scoped_release>())
      .def("recommend", &Recommender::recommend, py::arg("histories"), py::arg("candidates"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "recommend_batch",
          [](const Recommender& self, const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>>& requests) {
            std::vector<speeder_rt::Request> batch;
            batch.reserve(requests.size());
            for (const auto& [history, candidates] : requests) batch.push_back({history, candidates});
            return self.recommend_batch(batch);
          },
          py::arg("requests"), py::call_guard<py::gil_scoped_release>())
      .def(
          "topk",
          [](const Recommender& self, const IdRows& histories, int64_t k) {
            speeder_rt::TopK top = self.topk(histories, k);
            return std::make_pair(std::move(top.ids), std::move(top.scores));
          },
          py::arg("histories"), py::arg("k"), py::call_guard<py::gil_scoped_release>());
}
