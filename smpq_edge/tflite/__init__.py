"""The .tflite file format and the TFLM host interpreter."""
