"""The quantizer backend: fused fake-quant kernels (and, after the layering step, quantizers, observers, insertion)."""
