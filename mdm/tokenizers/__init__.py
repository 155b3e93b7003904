"""Visual (dVAE, VQ-KD), acoustic (BEATs' random-projection and self-distilled) and text (SentencePiece)
tokenizers behind one interface.

>>> import mdm.tokenizers as T
>>> tok = T.load("runs/vqkd_demo")          # any saved tokenizer directory
>>> codes = tok.encode(images)              # float (B, 3, H, W) in [0, 1] → LongTensor (B, h, w)
>>> tok.codebook_size, tok.grid_size
>>> recon = dvae.decode(codes)              # dVAE only: (B, 3, H, W) in [0, 1]
>>> text = T.load("runs/spm")               # TextTokenizer: ids, padding_mask = text.encode(texts, max_len)

Model code (``base``, ``dvae``, ``vqkd``, ``vit``, ``quantizer``, ``text``) touches no files and no global
RNG; ``io`` saves and loads; ``data``, ``train``, ``evaluate``, ``show``, ``encode`` and ``cli`` implement
the ``mdm tokenizer`` commands. See docs/tokenizers.md.
"""

from __future__ import annotations

from mdm.registry import Registry
from mdm.tokenizers.acoustic import AcousticVQKD, RandomProjectionTokenizer
from mdm.tokenizers.base import VisualTokenizer
from mdm.tokenizers.dvae import DVAE
from mdm.tokenizers.io import load, save_tokenizer
from mdm.tokenizers.text import TextTokenizer
from mdm.tokenizers.vqkd import VQKD

#: kind → tokenizer class (``config.json`` ``"kind"``).
TOKENIZERS: Registry = Registry("tokenizer")
TOKENIZERS.register("dvae")(DVAE)
TOKENIZERS.register("vqkd")(VQKD)
TOKENIZERS.register("acoustic_rp")(RandomProjectionTokenizer)
TOKENIZERS.register("acoustic_vqkd")(AcousticVQKD)

__all__ = [
    "AcousticVQKD",
    "DVAE",
    "RandomProjectionTokenizer",
    "TOKENIZERS",
    "TextTokenizer",
    "VQKD",
    "VisualTokenizer",
    "load",
    "save_tokenizer",
]
