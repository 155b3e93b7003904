"""Export and import of checkpoints: unilm/torchscale BEiT-3, timm, safetensors, ONNX (``mdm export``)."""

from mdm._lazy import lazy_attributes

# mdm.export.unilm etc. as attributes, imported on first use
__getattr__, __dir__ = lazy_attributes(globals())
