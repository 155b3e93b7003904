"""Launching and planning distributed runs (``mdm launch``)."""
