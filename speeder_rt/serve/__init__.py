"""Serving on NVIDIA Triton Inference Server: ``python -m speeder_rt.serve --export DIR``.

``server`` launches the ``tritonserver`` of the ``nvidia-pytriton`` wheel through PyTriton on the export's
Python-backend repository (``speeder_rt.export.triton_repo``); ``triton_model`` is that backend's model
(``Recommender`` inside), ``batch`` turns one Triton batch of ragged requests into one runtime call.
Needs the ``serve`` extra, which pins numpy<2: ``make serve EXPORT=DIR`` uses its own venv (.venv-serve).
"""
