"""The demo world: scenes of coloured shapes, their captions, VQA questions and NLVR2 statements.

- :mod:`mdm.data.demo.scenes` — scenes and their rendering (deterministic from a seed);
- :mod:`mdm.data.demo.language` — captions, VQA questions/answers, NLVR2 statements, a text corpus;
- :mod:`mdm.data.demo.identifying` — retrieval captions true of one image only, scenes that do not repeat;
- :mod:`mdm.data.demo.writers` — :func:`write_demo_dataset`: everything on disk in the published
  COCO / VQAv2 / NLVR2 / Karpathy formats that ``mdm data shards`` and ``mdm finetune`` read.

``mdm demo`` (:mod:`mdm.demo`) runs the whole pipeline on it.
"""

from mdm.data.demo.writers import FULL, QUICK, DemoSizes, write_demo_dataset

__all__ = ["DemoSizes", "FULL", "QUICK", "write_demo_dataset"]
