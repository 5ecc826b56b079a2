"""Export Speeder's scoring graphs (ONNX, TensorRT, AOTInductor) and load them again.

``format``: what an export directory holds (names, version, ``Ranges``, the ``Runner`` protocol, the ``export.json``
reader; standard library and numpy only). ``exporter``: ``export_checkpoint`` / ``export_model`` (PyTorch and the
model). ``runners``: ``load_runner``, each engine imported when it is used. Nothing is imported here, so a process
that only serves an export never loads the exporter.
"""
