"""Launching and planning distributed runs (``mdm launch``)."""

from mdm._lazy import lazy_attributes

# mdm.launch.plan etc. as attributes, imported on first use
__getattr__, __dir__ = lazy_attributes(globals())
