"""Training: the loop, optimizer and schedule, checkpoints, ``mdm pretrain`` / ``mdm finetune`` and
``mdm checkpoint consolidate`` (each command module exposes ``main(argv) -> int``)."""

from mdm._lazy import lazy_attributes

# mdm.train.pretrain etc. as attributes, imported on first use
__getattr__, __dir__ = lazy_attributes(globals())
