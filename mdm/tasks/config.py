"""Config sections of the fine-tuning recipes: ``task:`` (what to train) and ``data:`` (where and how to read).

Split names: ``train`` / ``val`` / ``test`` resolve to ``data.train_splits`` / ``data.val_split`` /
``data.test_split``; any other name is read as a split of the published files (``val2014``,
``test-dev2015``, ``dev``, ``test1``, ``restval``...). Empty fields take the task's defaults (see
``docs/finetune.md``), which follow unilm/beit3 (BEiT-3, Wang et al. 2023) and ViLT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mdm.data.audio import AudioFrontendConfig
from mdm.distributed.strategy import DistributedConfig
from mdm.models.config import ModelConfig
from mdm.train.loop import TrainConfig
from mdm.train.metrics import LoggingConfig
from mdm.train.optim import OptimConfig

TaskName = Literal["vqav2", "nlvr2", "retrieval", "classification", "audio_classification", "captioning"]


@dataclass
class AudioDataConfig:
    """``data.audio``: the audio-classification recipe's front end, layout and augmentation.

    Attributes:
        frontend: waveform → filterbank (``style``, ``target_frames``...; see :mod:`mdm.data.audio`).
        layout: ``esc50`` (``meta/esc50.csv`` + ``audio/``, single-label), ``audioset`` (segment CSVs +
            ``class_labels_indices.csv``, multi-label) or ``auto`` (``esc50`` when ``meta/esc50.csv`` exists).
        audio_dir: folder of the clips under ``data.root`` (AudioSet: ``<YTID>.wav|flac|mp3|ogg`` or
            ``Y<YTID>.wav``).
        class_index_csv: AudioSet class list (``index,mid,display_name``) under ``data.root``.
        freqm: SpecAugment frequency mask: width uniform in [0, freqm) mel bins (AudioMAE fine-tuning: 48).
        timem: SpecAugment time mask width bound for 1024 frames (AudioMAE: 192), scaled to
            ``target_frames`` (96 for 512 frames).
        mixup: mixup Beta(α, α) parameter, batch-wise as timm's ``Mixup`` (AudioMAE: 0.5; 0 = off).
        mixup_prob: probability of mixing a training batch.
    """

    frontend: AudioFrontendConfig = field(default_factory=AudioFrontendConfig)
    layout: Literal["auto", "esc50", "audioset"] = "auto"
    audio_dir: str = "audio"
    class_index_csv: str = "class_labels_indices.csv"
    freqm: int = 48
    timem: int = 192
    mixup: float = 0.5
    mixup_prob: float = 1.0


@dataclass
class TaskDataConfig:
    """The ``data:`` section: dataset location, splits, text and image processing.

    Attributes:
        root: dataset directory holding the files exactly as published (see ``docs/finetune.md``).
        train_splits: published splits used for training (empty = the task's default).
        val_split: split used for validation during training and by ``mdm evaluate``.
        test_split: split used by ``mdm predict``.
        image_size: side of the square network input.
        max_text_len: text length in tokens including [bos] and [eos].
        hflip: random horizontal flip in training (unilm flips for VQA too).
        crop_scale: RandomResizedCrop area range in training.
        randaug: timm RandAugment in training, with BEiT-3's op list (``randaug_config``).
        randaug_config: timm RandAugment config string.
        on_error: ``skip`` malformed records (missing image, unknown question id...), counting and
            logging them, or ``error``: stop at the first one with a message naming it.
        num_workers: DataLoader worker processes.
        answer_min_count: VQA: answers given as ``multiple_choice_answer`` at least this often over
            train2014+val2014 form the answer vocabulary (9 → 3129 classes on VQAv2).
        val_holdout_images: VQA: ``val2014:rest`` / ``val2014:trainable`` split val2014 by image into
            this many held-out images and the rest (ViLT/unilm use 1000).
        holdout_seed: seed of that image shuffle.
        karpathy_file: retrieval: ``dataset_coco.json`` or ``dataset_flickr30k.json`` (in ``root``).
        image_dir: retrieval: image folder under ``root`` (empty: the Karpathy ``filepath`` for COCO,
            ``flickr30k-images`` for Flickr30k).
        fold: audio_classification on ESC-50: the held-out fold (1–5) validated on, the others trained on;
            0 = all five in turn (``mdm finetune`` runs the 5-fold cross-validation and reports the mean).
        audio: audio_classification: front end, layout, SpecAugment, mixup.
    """

    root: str = ""
    train_splits: list[str] = field(default_factory=list)
    val_split: str = ""
    test_split: str = ""
    image_size: int = 224
    max_text_len: int = 64
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    randaug: bool = False
    randaug_config: str = "rand-n2-m7"
    on_error: Literal["skip", "error"] = "skip"
    num_workers: int = 2
    answer_min_count: int = 9
    val_holdout_images: int = 1000
    holdout_seed: int = 0
    karpathy_file: str = "dataset_coco.json"
    image_dir: str = ""
    fold: int = 0
    audio: AudioDataConfig = field(default_factory=AudioDataConfig)

    def validate(self) -> None:
        """Raises ValueError on impossible values."""
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be at least 3 ([bos] text [eos]), got {self.max_text_len}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")


@dataclass
class TaskConfig:
    """The ``task:`` section: which recipe and its head/loss options.

    Attributes:
        name: ``vqav2``, ``nlvr2``, ``retrieval``, ``classification``, ``audio_classification`` or
            ``captioning``.
        num_classes: classification: number of classes (0 = the class folders of the train split;
            audio_classification: the classes of the dataset's metadata).
        label_smoothing: classification / audio_classification / captioning (unilm: 0.1): label smoothing.
        head_init_scale: NLVR2 / classification: the head's output Linear weights are multiplied by this
            after init (unilm uses 0.001).
        logit_scale_init: retrieval: initial temperature 1/τ (stored as its log; CLIP uses 1/0.07).
        eval_batch_text_chunk: retrieval: images scored against texts in chunks of this many images.
        itm_weight: retrieval: weight of VLMo's image-text matching loss on the fusion encoder, trained
            beside the contrastive loss with hard negatives drawn from its similarities (0 = a dual
            encoder only, as unilm/beit3 and VLMo's retrieval fine-tuning). The ITM head starts from the
            pretraining's ``heads.itm.*`` when ``init`` has them.
        itm_negatives: retrieval: how ITM's negative image (per caption) and caption (per image) are drawn
            from the other pairs of the global batch. ``hard``: in proportion to the softmax of the
            contrastive similarities (VLMo). ``random``: uniformly. With hard negatives a small model
            trained from a weak init can stay on the class prior (loss H(1/3) = 0.636, every pair "no
            match"): the negatives become as close to the positives as the dual encoder can tell, before
            the fusion encoder has learned to compare image and caption at all (docs/finetune.md).
        itm_pool: retrieval: the fusion pass's token the ITM head reads. ``image``: x[:, 0], the image
            [CLS] of mdm's image-first sequence (as the pretraining ITM objective, whose head ``init``
            loads). ``text``: the text [bos] (VLMo's joint sequence starts with the text); it left the
            prior sooner in our tests.
        itm_random_warmup: retrieval: the first this many training steps (micro-batches) draw random
            ITM negatives whatever ``itm_negatives`` says, then ``itm_negatives`` applies (a curriculum;
            the count restarts when a run resumes).
        itm_false_negatives: retrieval: ``skip`` (default) never draws as an ITM negative a pair that
            shows the same image (another of its captions) or has the same caption word for word (written
            for another image): they are matches labelled "no match" (ALBEF and BLIP mask the same image
            id; VLMo's pretraining batches have one caption per image). ``keep``: VLMo's sampler as it is.
        rerank_k: retrieval evaluation: re-rank each query's k best dual-encoder candidates with the
            fusion encoder's ITM score (VLMo's ``k_test``) and report ``rerank_*`` recall beside the
            dual-encoder recall (0 = off).
        rerank_batch_size: retrieval: image-caption pairs per fusion pass when re-ranking.
        rerank_itm_scale: retrieval: a re-ranked candidate scores ``dual + w * itm``. A number is ``w``
            (VLMo and ALBEF add the ITM logit as it is: 1.0). ``auto``: the ratio of the spreads of the
            dual scores and of the ITM logits among each query's top k (pooled over the queries, per
            direction), so that neither ranking drowns the other (a cosine similarity spreads by ~0.05
            among the top k, a logit by ~1).
        pool: vqav2 / nlvr2 / retrieval: what summarises a sequence for the head. ``cls``: the first token
            of each modality (vision [CLS], text [bos]), as BEiT-3 and VLMo. ``mean``: the mean of the
            patch tokens and of the real text tokens, as BEiT v1 fine-tunes classification — masked data
            modeling never trains the [CLS] output directly, so a short fine-tuning of a small model
            starts from more information with ``mean``. audio_classification: ``mean`` or ``cls`` as
            these, or ``max`` / ``mean_max`` (the element-wise maximum of the non-padding patch tokens,
            or its sum with their mean; audio_classification only).
        caption_mask_prob: captioning: fraction of caption tokens (after [bos], [eos] included) replaced
            for the masked-token loss, at least one (unilm ``captioning_mask_prob``: 0.6; its README: 0.7).
        mask_token_id: captioning: the [MASK] id (-1 = the text tokenizer's ``mask_id``).
        beam_size: captioning: beams at decoding (1 = greedy; unilm: 3).
        max_caption_len: captioning: generated tokens at most, [eos] included.
        min_caption_len: captioning: generated tokens before [eos] may be emitted.
        length_penalty: captioning: beam scores are ``sum log p / length ** length_penalty`` (unilm: 0.6).
        no_repeat_ngram_size: captioning: forbid repeating n-grams of this size (0 = off).
        meteor: captioning: also compute METEOR when Java and its jar are found (each evaluation then
            pays ~10 s of JVM start-up; :mod:`mdm.tasks.caption_eval`).
    """

    name: TaskName = "vqav2"
    num_classes: int = 0
    label_smoothing: float = 0.0
    head_init_scale: float = 0.001
    logit_scale_init: float = 1.0 / 0.07
    eval_batch_text_chunk: int = 1024
    itm_weight: float = 0.0
    itm_negatives: Literal["hard", "random"] = "hard"
    itm_pool: Literal["image", "text"] = "image"
    itm_random_warmup: int = 0
    itm_false_negatives: Literal["skip", "keep"] = "skip"
    rerank_k: int = 0
    rerank_batch_size: int = 64
    rerank_itm_scale: float | Literal["auto"] = 1.0
    pool: Literal["cls", "mean", "max", "mean_max"] = "cls"
    caption_mask_prob: float = 0.6
    mask_token_id: int = -1
    beam_size: int = 3
    max_caption_len: int = 30
    min_caption_len: int = 0
    length_penalty: float = 0.6
    no_repeat_ngram_size: int = 0
    meteor: bool = True


@dataclass
class FinetuneConfig:
    """Schema of ``mdm finetune`` (``configs/finetune/*.yaml``).

    Attributes:
        task: the recipe and its head options.
        data: dataset location and processing.
        model: the backbone architecture (``arch`` preset + overrides, e.g. ``img_size: 480``,
            ``normalize_output: false`` for VQA and classification as unilm).
        init: ``scratch``, an mdm model directory (``mdm pretrain`` output / ``mdm import``), or a unilm /
            torchscale BEiT-3 checkpoint file.
        text_tokenizer: the text tokenizer (SentencePiece model) the backbone was pretrained with;
            unused by classification.
        batch_size: micro-batch per process.
        eval_batch_size: evaluation batch per process.
        epochs: when > 0, ``train.steps`` = epochs × optimizer steps per epoch.
        warmup_epochs: when > 0, ``optim.warmup_steps`` = warmup_epochs × optimizer steps per epoch.
        freeze_backbone_epochs: when > 0, ``optim.freeze_backbone_steps`` = this × optimizer steps per
            epoch: LP-FT, only the head trains for these first epochs, then everything
            (docs/finetune.md).
        eval_every: validate every N optimizer steps (0 = only at the end).
        optim: AdamW, layer-wise lr decay, head lr multiplier (``optim.head_prefixes``), schedule.
        train: the loop (steps, checkpoints, resume, output directory).
        distributed: single / DDP / DeepSpeed ZeRO.
        logging: metric sinks and progress.
    """

    task: TaskConfig = field(default_factory=TaskConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: str = "scratch"
    text_tokenizer: str = ""
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: float = 0.0
    warmup_epochs: float = 0.0
    freeze_backbone_epochs: float = 0.0
    eval_every: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
