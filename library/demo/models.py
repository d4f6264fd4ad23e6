"""Architectures of the demo's base model (SD1.5 layout at toy size) and of the toy-world classifier."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from library.demo.world import COLOURS, PATTERNS, SHAPES, SIZES

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "demo"
BASE_MODEL = DEMO_DIR / "base_model"
CLASSIFIER = DEMO_DIR / "classifier.safetensors"
CONCEPT_DIR = DEMO_DIR / "concept"

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
    sample_size=64,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
    attention_head_dim=4, norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        steps_offset=1, clip_sample=False, set_alpha_to_one=False)
HEADS = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(COLOURS), "pattern": list(PATTERNS),
         "size": list(SIZES)}


def scene_labels(scene) -> dict[str, int]:
    """The class index of each of a scene's attributes, per head of HEADS."""
    return {head: classes.index(getattr(scene, head)) for head, classes in HEADS.items()}  # heads are Scene fields


class ToyClassifier(nn.Module):
    """A small CNN with one head per attribute; its penultimate features serve as an image
    embedding (the demo's analogue of DINO features for concept fidelity and diversity)."""

    def __init__(self, width: int = 24, feature_dim: int = 128):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(), nn.MaxPool2d(2))

        # A strided stem: the world's shapes are large, 32 x 32 is enough to tell them apart.
        stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.SiLU())
        self.body = nn.Sequential(stem, block(width, width * 2), block(width * 2, width * 4),
                                  block(width * 4, width * 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(width * 4 + 6, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in HEADS.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, 64, 64) in [-1, 1] -> (B, feature_dim)."""
        h = self.pool(self.body(images)).flatten(1)
        # Colour statistics go in directly: the border (background) and centre (object) means.
        border = torch.cat([images[..., :4, :].flatten(2), images[..., -4:, :].flatten(2)], dim=2).mean(2)
        centre = images[..., 24:40, 24:40].flatten(2).mean(2)
        return self.features(torch.cat([h, border, centre], dim=1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(images)
        return {name: head(f) for name, head in self.heads.items()}


def load_classifier(path: Path = CLASSIFIER) -> ToyClassifier:
    from safetensors.torch import load_file

    from library.errors import UserError

    if not path.is_file():
        raise UserError(f"{path}: the demo classifier is missing (python tools/train_demo_classifier.py writes it)")
    model = ToyClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
