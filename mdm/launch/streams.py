"""The encoder passes of one micro-batch, from a pretraining or fine-tuning config.

Pretraining (BEiT-3's masked data modeling, Wang et al. 2023): each objective runs once per micro-batch
of its stream — ``mim``/``cls_mim``/``mae`` on the image stream (1 + P tokens), ``mlm`` on the text stream
(T tokens), ``mvlm`` on the image-text pair stream (1 + P + T tokens). Loss heads predict at the masked
positions: 40 % of the patches (MIM, MVLM), 15 % of the text (MLM), 50 % of the text (MVLM) unless the
data section says otherwise. Fine-tuning follows unilm/beit3: VQAv2 one joint pass, NLVR2 a joint pass
over 2B (both images), retrieval an image-only and a text-only pass, classification image-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mdm.launch.memory import EncoderPass, encoder_pass

#: Objective → the stream it reads.
OBJECTIVE_STREAM = {"mim": "image", "cls_mim": "image", "mae": "image", "mlm": "text", "mvlm": "pair"}
#: BEiT-3 masking ratios used when the data section does not give them.
DEFAULT_RATIOS = {"image": 0.4, "text": 0.15, "pair_text": 0.5, "pair_image": 0.4}
DEFAULT_TEXT_LEN = 64  # unilm/beit3 num_max_bpe_tokens


def lookup(section: Any, *paths: str) -> tuple[Any, str] | tuple[None, None]:
    """The first of ``paths`` (dotted) present in ``section`` (a mapping or a config object)."""
    for path in paths:
        node: Any = section
        for part in path.split("."):
            if isinstance(node, Mapping):
                node = node.get(part)
            else:
                node = getattr(node, part, None)
            if node is None:
                break
        if node is not None and not callable(node):
            return node, path
    return None, None


def _stream_batch(data: Any, stream: str, given: Mapping[str, int], notes: list[str]) -> int:
    if stream in given:
        notes.append(f"{stream} stream: micro-batch {given[stream]} from --batch")
        return int(given[stream])
    value, _ = lookup(data, f"{stream}.batch_size")
    if value is None:
        raise ValueError(
            f"no micro-batch size for the {stream} stream: the config has no data.{stream} section; "
            f"pass --batch {stream}=N"
        )
    notes.append(f"{stream} stream: micro-batch {value} from data.{stream}.batch_size")
    return int(value)


def _stream_value(data: Any, stream: str, key: str, default: float) -> float:
    """``data.<stream>.<key>`` (:class:`mdm.data.streams.StreamConfig`), or ``default`` when unset."""
    value, _ = lookup(data, f"{stream}.{key}")
    return float(value) if value is not None else default


def pretrain_passes(
    cfg: Any, given: Mapping[str, int], notes: list[str]
) -> tuple[list[EncoderPass], dict[str, int]]:
    """Passes of one micro-batch of ``mdm pretrain`` and the micro-batch of each stream."""
    m, data, obj = cfg.model, cfg.data, cfg.objectives
    P = m.num_patches
    passes: list[EncoderPass] = []
    micro: dict[str, int] = {}
    for name in obj.objectives:
        stream = OBJECTIVE_STREAM.get(name)
        if stream is None:
            notes.append(f"objective {name!r}: unknown to the planner, not counted")
            continue
        if stream not in micro:
            micro[stream] = _stream_batch(data, stream, given, notes)
        B = micro[stream]
        T = int(_stream_value(data, stream, "max_text_len", DEFAULT_TEXT_LEN))
        r_img = _stream_value(data, stream, "image_mask_ratio", DEFAULT_RATIOS["image"])
        if name in ("mim", "cls_mim"):
            passes.append(encoder_pass(m, f"image: {name}", B, 1 + P, [(r_img * P, obj.codebook_size)]))
            if name == "cls_mim":  # BEiT v2: extra blocks over [last CLS, early patches] + the MIM head again
                extra = encoder_pass(
                    m, "image: cls_mim head blocks", B, 1 + P, [(r_img * P, obj.codebook_size)]
                )
                extra.layers = obj.cls_pt_layers
                passes.append(extra)
        elif name == "mae":
            visible = 1 + round((1 - obj.mae_mask_ratio) * P)
            passes.append(encoder_pass(m, "image: mae encoder", B, visible))
            d = obj.mae_decoder_dim
            pixels = m.patch_size**2 * m.in_chans
            passes.append(
                EncoderPass("image: mae decoder", B, 1 + P, obj.mae_decoder_depth, d, 4 * d,
                            logits=[(obj.mae_mask_ratio * P, pixels)])
            )  # fmt: skip
        elif name == "mlm":
            r = _stream_value(data, "text", "text_mask_ratio", DEFAULT_RATIOS["text"])
            passes.append(encoder_pass(m, "text: mlm", B, T, [(r * T, m.vocab_size)]))
        elif name == "mvlm":
            r_t = _stream_value(data, "pair", "text_mask_ratio", DEFAULT_RATIOS["pair_text"])
            logits = [(r_t * T, m.vocab_size), (r_img * P, obj.codebook_size)]
            passes.append(encoder_pass(m, "pair: mvlm", B, 1 + P + T, logits))
    return passes, micro


def task_passes(
    cfg: Any, given: Mapping[str, int], notes: list[str]
) -> tuple[list[EncoderPass], dict[str, int]]:
    """Passes of one micro-batch of ``mdm finetune`` for ``cfg.task.name``."""
    m, task = cfg.model, cfg.task.name
    B = int(given.get(task, given.get("batch", cfg.batch_size)))
    notes.append(f"{task}: micro-batch {B} per rank ({'--batch' if B != cfg.batch_size else 'batch_size'})")
    P, T = m.num_patches, cfg.data.max_text_len
    if task == "vqav2":
        passes = [encoder_pass(m, "vqav2: image+question", B, 1 + P + T, [(1, _num_classes(cfg))])]
    elif task == "nlvr2":  # both images of a pair in one batch of 2B
        passes = [encoder_pass(m, "nlvr2: (image_a|image_b)+text", 2 * B, 1 + P + T)]
    elif task == "retrieval":
        passes = [encoder_pass(m, "retrieval: image", B, 1 + P), encoder_pass(m, "retrieval: text", B, T)]
    elif task == "classification":
        passes = [encoder_pass(m, "classification: image", B, 1 + P, [(1, _num_classes(cfg))])]
    else:
        raise ValueError(f"task {task!r} is unknown to the planner")
    return passes, {task: B}


def _num_classes(cfg: Any) -> int:
    if cfg.task.num_classes > 0:
        return int(cfg.task.num_classes)
    return 3129 if cfg.task.name == "vqav2" else 1000  # VQAv2 answer vocabulary / ImageNet-1k


def task_head_parameters(cfg: Any) -> dict[str, int]:
    """Parameters of unilm/beit3's task heads (``modeling_finetune.py``) for width D."""
    D, task = cfg.model.embed_dim, cfg.task.name
    if task == "vqav2":
        C = _num_classes(cfg)
        return {"pooler": 2 * D + D * D + D, "head": (D * 2 * D + 2 * D) + 4 * D + (2 * D * C + C)}
    if task == "nlvr2":
        return {"head": 8 * D + (4 * D * 2 * D + 2 * D) + 4 * D + (2 * D * 2 + 2)}
    if task == "retrieval":
        return {"vision_head": D * D, "language_head": D * D, "logit_scale": 1}
    if task == "classification":
        C = _num_classes(cfg)
        return {"fc_norm": 2 * D, "head": D * C + C}
    raise ValueError(f"task {task!r} is unknown to the planner")
