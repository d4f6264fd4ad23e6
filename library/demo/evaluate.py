"""Generating with the demo model and scoring images with the toy-world classifier."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from library.demo.models import HEADS, ToyClassifier, to_tensor
from library.demo.world import COLOURS, PATTERNS, SIZES, Scene, held_out_pairs


def pipeline(bundle, unet=None, scheduler: str = "ddim"):
    """A StableDiffusionPipeline over loaded components (the UNet may carry an active LoRA)."""
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler}[scheduler]
    config = {k: v for k, v in bundle.scheduler_config.items() if not k.startswith("_")}
    sched = cls.from_config({**config, "clip_sample": False, "set_alpha_to_one": False})
    pipe = diffusers.StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                             tokenizer=bundle.tokenizers[0], unet=unet or bundle.unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[tuple[str, int]], steps: int = 25, scale: float = 5.0, batch: int = 8):
    """One image per (prompt, seed), batched; the same seed gives the same image."""
    images = []
    for k in range(0, len(prompts), batch):
        chunk = prompts[k:k + batch]
        gens = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        out = pipe(prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=scale, generator=gens,
                   height=64, width=64)
        images.extend(out.images)
    return images


@dataclass
class Scores:
    predictions: dict[str, list[str]]   # per head, the predicted class of each image
    embeddings: torch.Tensor            # (N, D), L2-normalised


@torch.no_grad()
def score(classifier: ToyClassifier, images) -> Scores:
    x = to_tensor(images)
    out = classifier(x)
    emb = torch.nn.functional.normalize(classifier.embed(x), dim=1)
    preds = {k: [HEADS[k][i] for i in out[k].argmax(1).tolist()] for k in HEADS}
    return Scores(preds, emb)


def held_out_prompts(per_pair: int = 5, seed: int = 0) -> list[tuple[Scene, int]]:
    """Scenes of the (shape, colour) pairs the base model never saw, on random backgrounds."""
    rng = random.Random(seed)
    out = []
    for shape, colour in sorted(held_out_pairs()):
        for k in range(per_pair):
            bg = rng.choice([c for c in COLOURS if c != colour])
            out.append((Scene(shape, colour, rng.choice(list(SIZES)), bg, rng.choice(PATTERNS)), 1000 + len(out)))
    return out


def accuracy(scores: Scores, scenes: list[Scene], heads=("shape", "colour", "background")) -> dict[str, float]:
    result = {}
    for head in heads:
        truth = [getattr(s, head) for s in scenes]
        result[head] = sum(p == t for p, t in zip(scores.predictions[head], truth)) / max(len(truth), 1)
    return result


def mean_pairwise_distance(emb: torch.Tensor) -> float:
    """1 - cosine similarity, averaged over distinct pairs (diversity)."""
    n = emb.shape[0]
    if n < 2:
        return 0.0
    sim = emb @ emb.T
    return float((1 - sim)[~torch.eye(n, dtype=torch.bool)].mean())

