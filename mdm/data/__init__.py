"""mdm data layer: demo data, WebDataset shards, streams, transforms, masking, collate and mixing.

Sub-modules are imported on demand (``from mdm.data import masking``); importing :mod:`mdm.data` itself
stays cheap so that ``mdm data --help`` and the demo generator do not pull in torch or webdataset.

- :mod:`mdm.data.demo` — a deterministic synthetic world of coloured shapes (images, captions, VQA,
  NLVR2 statements, a text corpus) written in the official COCO / VQAv2 / NLVR2 / Karpathy formats.
- :mod:`mdm.data.masking` — BEiT block-wise image masking and BERT-style MLM masking.
- :mod:`mdm.data.shards` — ``mdm data shards``: WebDataset tar writers.
- :mod:`mdm.data.streams` — resumable, mixed, per-rank/per-worker shard readers.
"""

from mdm._lazy import lazy_attributes

# mdm.data.streams etc. as attributes, imported on first use
__getattr__, __dir__ = lazy_attributes(globals())
