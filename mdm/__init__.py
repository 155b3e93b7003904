"""mdm — masked data modeling for Multiway Transformers (BEiT, BEiT v2, BEiT-3, VLMo, MAE).

Pretrain with MIM / MLM / MVLM against dVAE or VQ-KD visual tokens, fine-tune on VQAv2, NLVR2 and
retrieval, and export checkpoints — on one config and checkpoint format.

>>> import mdm
>>> mdm.list_models()[:2]                             # = mdm.models.list_models()
['beit3_base', 'beit3_giant']
>>> model = mdm.create_model("vlmo_tiny", depth=2)    # = mdm.models.create_model
>>> model = mdm.from_pretrained("runs/beit3_base")    # an mdm model directory
>>> tok = mdm.tokenizers.load("runs/vqkd")            # a tokenizer directory

The sub-packages (``mdm.models``, ``mdm.tokenizers``, ``mdm.objectives``, ``mdm.data``, ``mdm.tasks``,
``mdm.train``, ``mdm.export``, ``mdm.distributed``, ``mdm.config``, ``mdm.launch``) are attributes that
import on first use: ``import mdm`` itself loads neither torch nor any sub-package.
"""

from __future__ import annotations

from mdm._lazy import lazy_attributes

__version__ = "0.1.0"

_SUBPACKAGES = (
    "config",
    "data",
    "distributed",
    "export",
    "launch",
    "models",
    "objectives",
    "registry",
    "tasks",
    "tokenizers",
    "train",
)
_SHORTCUTS = {
    "create_model": "mdm.models:create_model",
    "list_models": "mdm.models:list_models",
    "from_pretrained": "mdm.models.io:from_pretrained",
    "save_pretrained": "mdm.models.io:save_pretrained",
    "load_config": "mdm.config:load_config",
}

__getattr__, __dir__ = lazy_attributes(globals(), _SUBPACKAGES, _SHORTCUTS)
__all__ = [  # written out (not built from the tuples) so that linters and type checkers read it
    "__version__",
    "config",
    "data",
    "distributed",
    "export",
    "launch",
    "models",
    "objectives",
    "registry",
    "tasks",
    "tokenizers",
    "train",
    "create_model",
    "list_models",
    "from_pretrained",
    "save_pretrained",
    "load_config",
]

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: 10 ms of a 13 ms import)
if TYPE_CHECKING:  # what the lazy attributes are, for type checkers and IDEs
    from mdm import (
        config,
        data,
        distributed,
        export,
        launch,
        models,
        objectives,
        registry,
        tasks,
        tokenizers,
        train,
    )
    from mdm.config import load_config
    from mdm.models import create_model, list_models
    from mdm.models.io import from_pretrained, save_pretrained
