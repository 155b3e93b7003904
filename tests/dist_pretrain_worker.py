"""Run under torchrun by tests/test_pretrain_dist.py: ``mdm pretrain`` through the real build path, then
(on every rank, as ZeRO-3 gathers collectively) the backbone's output on a fixed input, saved by rank 0."""

import sys

import torch

from mdm.config import load_config
from mdm.train.pretrain import PretrainConfig, build_run, export_backbone

if __name__ == "__main__":
    torch.set_num_threads(1)
    out_file, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(PretrainConfig, config, overrides)
    trainer = build_run(cfg)
    trainer.fit()
    if trainer.step >= cfg.train.steps:
        export_backbone(trainer, cfg)
        g = torch.Generator().manual_seed(0)
        image = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size, generator=g)
        text = torch.randint(3, 30, (2, 7), generator=g)
        backbone = trainer.strategy.module.backbone
        backbone.eval()
        saved = {"image": image, "text": text}
        with torch.no_grad():
            saved["out"] = backbone(image=image, text=text)
            if cfg.model.has_audio:  # a clip and a clip + caption through the audio expert
                saved["audio"] = torch.randn(2, 64, cfg.model.audio_mel_bins, generator=g)
                saved["audio_out"] = backbone(audio=saved["audio"], text=text)
        if trainer.strategy.is_main:
            torch.save(saved, out_file)
    trainer.strategy.close()
