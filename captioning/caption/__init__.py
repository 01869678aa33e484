"""``captioning caption``: captioning image files from the command line (``run.py``), with the
PyTorch engine (captioning/api.py) or the ONNX engine (captioning/export/runtime.py)."""
