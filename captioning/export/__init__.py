"""Export: model folders and ONNX graphs that caption without PyTorch.

``captioning.export.onnx`` (needs torch and onnx) writes the graphs; ``captioning.export.runtime``
(needs onnxruntime and NumPy, never torch) decodes with them. Install with the ``export`` extra.
"""
