"""What a LoRA file holds and whether AUTOMATIC1111/Forge, ComfyUI and diffusers will load it.

The loader rules are those documented for each loader (see docs/webui.md); diffusers' own kohya
converter is also run, as an independent check, when `check_diffusers` is set.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from library.lora.compat import best_tree, no_lora
from library.lora.kohya_file import non_finite
from library.lora.weights import LoraWeights, from_tensors

TE2_ATTENTION = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")


def _prefix(key: str) -> str:
    if key.startswith("lora_"):
        return key.split("_", 2)[0] + "_" + key.split("_", 2)[1]
    return key.split(".", 1)[0]


def unet_naming(names: list[str]) -> str:
    sgm = any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in names)
    diffusers = any(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", n) for n in names)
    return "mixed" if sgm and diffusers else "sgm" if sgm else "diffusers" if diffusers else "none"


def _verdicts(tensors: dict, weights: LoraWeights | None, error: str | None) -> dict[str, dict]:
    keys = list(tensors)
    kohya_keys = [k for k in keys if k.startswith("lora_")]
    peft_keys = [k for k in keys if ".lora_A." in k or ".lora_B." in k or k.endswith(("lora_A.weight", "lora_B.weight"))]
    names = sorted({k.split(".", 1)[0] for k in kohya_keys})
    naming = unet_naming(names)
    problems = {"a1111": [], "comfyui": [], "diffusers": []}
    notes = {"a1111": [], "comfyui": [], "diffusers": []}
    if error:
        for loader in problems:
            problems[loader].append(error)
    foreign = [k for k in kohya_keys if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha",
                                                        ".dora_scale"))]
    if foreign:
        problems["diffusers"].append(f"{len(foreign)} tensors other than lora_down/lora_up/alpha/dora_scale "
                                     f"(e.g. {foreign[0]}): diffusers' kohya converter raises on them")
    if any(k.endswith(".dora_scale") for k in kohya_keys):
        problems["a1111"].append("DoRA: A1111 1.10's built-in loader normalises per input channel only; a "
                                 "per-output dora_scale (LyCORIS's default, ours) merges wrongly there (Forge loads it)")
        notes["comfyui"].append("DoRA per output channel: ComfyUI divides by the norm of the original weight, "
                                "LyCORIS by that of the merged weight; results differ slightly")
    if peft_keys and not kohya_keys:
        problems["a1111"].append("PEFT/diffusers key layout: A1111 expects kohya names "
                                 "(convert with tools/convert_lora.py --to kohya)")
    if naming == "mixed":
        problems["diffusers"].append("UNet names mix diffusers and SGM paths: diffusers silently drops the SGM ones")
        notes["a1111"].append("UNet names mix diffusers and SGM paths")
    if weights is not None:
        for loader, found in weights.index.family.lora_file_problems(naming, names).items():
            problems[loader].extend(found)
    bad_dots = [k for k in kohya_keys if "." in k.split(".", 1)[0]]
    if bad_dots:
        problems["a1111"].append("module names contain dots; A1111 splits at the first dot")
    no_text_model = [n for n in names if re.match(r"lora_te[12]?_encoder_layers", n)]
    if no_text_model:
        problems["a1111"].append(f"{len(no_text_model)} text-encoder names lack text_model_ "
                                 f"(e.g. {no_text_model[0]}): A1111 and ComfyUI do not match them")
        problems["comfyui"].append("text-encoder names lack text_model_: not matched")
    te2_layers: dict[str, set] = {}
    for n in names:
        m = re.match(r"(lora_te2_text_model_encoder_layers_\d+)_(self_attn_[qkvout]+_proj)$", n)
        if m:
            te2_layers.setdefault(m[1], set()).add(m[2])
    incomplete = [layer for layer, got in te2_layers.items() if got != set(TE2_ATTENTION)]
    if incomplete:
        problems["a1111"].append(f"{len(incomplete)} SDXL TE2 attention layers lack one of q/k/v/out: A1111 "
                                 "skips those layers silently")
    missing_alpha = [n for n in names if f"{n}.alpha" not in tensors]
    if kohya_keys and missing_alpha:
        for loader in notes:
            notes[loader].append(f"{len(missing_alpha)} modules have no alpha: loaded at scale 1 (alpha = rank)")
    if weights is not None and weights.unknown:
        for loader in problems:
            problems[loader].append(f"{len(weights.unknown)} tensors match no known layer (e.g. "
                                    f"{weights.unknown[0]}): 'lora key not loaded'")
    return {loader: {"loads": not problems[loader], "problems": problems[loader], "notes": notes[loader]}
            for loader in problems}


def diffusers_check(tensors: dict, weights: LoraWeights | None) -> str | None:
    """Run diffusers' own key conversion; returns its error, or None when it accepts the file."""
    if weights is None:
        return None
    try:
        weights.index.family.diffusers_lora_state_dict({k: v.clone() for k, v in tensors.items()})
    except ImportError:
        return None
    except Exception as exc:  # any failure of the independent loader is the verdict
        return f"diffusers' lora_state_dict rejects the file: {' '.join(str(exc).split())[:300]}"
    return None


def inspect_file(tensors: dict[str, torch.Tensor], metadata: dict, source: str, check_diffusers: bool = True) -> dict:
    """The report; a file with no LoRA module of any supported architecture is a UserError."""
    own, got = best_tree(tensors, metadata, source)
    if own is None:
        raise no_lora(tensors, source)
    weights = from_tensors(tensors, metadata, source, own.index)  # every module, fitting or not
    error = None
    if got.misfit:
        error = (f"{len(got.misfit)} modules have shapes that do not fit {own.label} (e.g. {got.misfit[0]}): "
                 "loaders fail on them")
    verdicts = _verdicts(tensors, weights, error)
    broken = non_finite(tensors)
    if broken:  # loaders read such a file without complaint; every image it touches turns to NaN
        for verdict in verdicts.values():
            verdict["problems"].append(f"{len(broken)} tensors hold NaN or infinite values (e.g. {broken[0]}): "
                                       "images made with it break; the trainer and the other tools refuse it")
            verdict["loads"] = False
    if check_diffusers and error is None:
        rejected = diffusers_check(tensors, weights)
        if rejected:
            verdicts["diffusers"]["problems"].append(rejected)
            verdicts["diffusers"]["loads"] = False
    per_prefix = Counter(_prefix(weights.index.peft_key(n) if weights.style == "peft" else n)
                         for n in weights.modules) if weights else Counter()
    # LoKr with both factors whole has no rank
    ranks = Counter("whole" if m.rank is None else m.rank for m in weights.modules.values()) if weights else Counter()
    alphas = Counter(m.alpha for m in weights.modules.values()) if weights else Counter()
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in tensors.values())
    return {
        "file": source,
        "architecture": weights.arch if weights else None,
        "fits": f"{got.matched} of {got.total} modules fit {own.label}",
        "base_model_version": metadata.get("ss_base_model_version"),
        "layout": weights.style if weights else None,
        "unet_naming": unet_naming(sorted({k.split(".", 1)[0] for k in tensors if k.startswith("lora_")})),
        "modules": len(weights.modules) if weights else 0,
        "modules_per_prefix": dict(sorted(per_prefix.items())),
        "network_type": weights.network_type if weights else None,
        "ranks": {str(k): v for k, v in sorted(ranks.items(), key=lambda kv: (kv[0] == "whole", 0 if kv[0] == "whole" else kv[0]))},
        "alphas": {repr(k): v for k, v in sorted(alphas.items())},
        "dtypes": dict(dtypes),
        "tensors": len(tensors),
        "unknown_tensors": weights.unknown if weights else [],
        "non_finite_tensors": broken,
        "compatibility": verdicts,
        "metadata": dict(sorted(metadata.items())),
    }
