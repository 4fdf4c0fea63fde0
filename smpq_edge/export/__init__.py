"""Export stage: PyTorch model -> int8 .tflite (onnx2tf) -> mixed int4/int8 .tflite for TFLM."""
