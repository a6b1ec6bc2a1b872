"""ONNX export of the Ring-linear model for onnxruntime-web (see onnx.py and graph.py)."""
