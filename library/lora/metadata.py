"""The string metadata of a LoRA file: kohya's `ss_*` keys, Stability's `modelspec.*` 1.0.1, ours.

WebUIs read `ss_base_model_version` (A1111 filters its LoRA list by it), `ss_output_name`,
`ss_network_*`, `ss_tag_frequency` and `sshs_model_hash` (written by kohya_file); the rest is
shown to users who inspect a file. All values are strings.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from library.config import Config
from library.config.network_kinds import network_kind

IMPLEMENTATION = "https://github.com/kohya-ss/sd-scripts"  # the layout our files follow


@dataclass
class TrainingFacts:
    """What happened in a run, beyond the config."""
    base_model_version: str          # ss_base_model_version (the model family's name for WebUIs)
    architecture: str                # modelspec.architecture
    text_encoders: int
    resolution: tuple[int, int]
    steps: int
    epochs: int
    started_at: float
    num_train_images: int = 0
    num_reg_images: int = 0
    batches_per_epoch: int = 0
    mixed_precision: str = "no"
    optimizer: str = "torch.optim.adamw.AdamW"
    datasets: list[dict] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)  # what the run's loss, noise, timesteps... report
    extra: dict[str, Any] = field(default_factory=dict)       # the training method's metadata


def _num(value: float | None) -> str:
    return "None" if value is None else repr(value)


def network_args(net) -> dict[str, str]:
    """ss_network_args as kohya (networks.lora) and LyCORIS (lycoris.kohya) write them."""
    kind = network_kind(net.network_type)
    args = {} if kind.algo is None else {"algo": kind.algo}
    args.update(kind.args)
    if net.conv_dim is not None:
        args.update(conv_dim=str(net.conv_dim), conv_alpha=str(net.conv_alpha_value))
    args.update(kind.option_args(net))
    if net.network_dropout:
        args["dropout"] = str(net.network_dropout)
    # networks.lora's per-block, LoRA+ and dropout arguments, in its "a,b,c" spelling
    for key in BLOCK_ARGS:
        value = getattr(net, key, None)
        if value is None or (key in ZERO_DEFAULT and not value):
            continue
        args[key] = ",".join(_num(v) if isinstance(v, float) else str(v) for v in value) \
            if isinstance(value, tuple) else (_num(value) if isinstance(value, float) else str(value))
    return args


BLOCK_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
              "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio",
              "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "rank_dropout", "module_dropout")
ZERO_DEFAULT = ("block_lr_zero_threshold", "rank_dropout", "module_dropout")


def build_metadata(cfg: Config, facts: TrainingFacts, finished_at: float | None = None) -> dict[str, str]:
    net, opt = cfg.network, cfg.optimizer
    finished_at = finished_at or time.time()
    args = network_args(net)
    te_lrs = opt.text_encoder_lrs(facts.text_encoders)
    w, h = facts.resolution
    meta = {
        "ss_base_model_version": facts.base_model_version,
        "ss_v2": str(facts.base_model_version.startswith("sd_v2")),
        "ss_v_parameterization": str(cfg.model.v_parameterization),
        "ss_sd_model_name": cfg.model.pretrained_model_name_or_path.replace("\\", "/").rstrip("/").split("/")[-1],
        "ss_output_name": cfg.saving.output_name,
        "ss_network_module": network_kind(net.network_type).network_module,
        "ss_network_dim": str(net.network_dim),
        "ss_network_alpha": _num(net.alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": _num(net.network_dropout),
        "ss_network_train_unet_only": str(net.network_train_unet_only),
        "ss_learning_rate": _num(opt.learning_rate),
        "ss_unet_lr": _num(opt.unet_lr or opt.learning_rate),
        "ss_text_encoder_lr": _num(None if net.network_train_unet_only else te_lrs[0]),
        "ss_optimizer": facts.optimizer,
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": str(opt.lr_warmup_steps),
        "ss_max_grad_norm": _num(opt.max_grad_norm),
        "ss_max_train_steps": str(cfg.training.max_train_steps),
        "ss_max_train_epochs": str(cfg.training.max_train_epochs),
        "ss_zero_terminal_snr": str(cfg.training.zero_terminal_snr),
        "ss_prior_loss_weight": _num(cfg.training.prior_loss_weight),
        "ss_full_bf16": str(cfg.training.full_bf16),
        "ss_fp8_base": str(cfg.training.fp8_base),
        "ss_fp8_base_unet": str(cfg.training.fp8_base_unet),
        "ss_cache_latents": str(cfg.data.cache_latents or cfg.data.cache_latents_to_disk),
        "ss_steps": str(facts.steps),
        "ss_epoch": str(facts.epochs),
        "ss_num_batches_per_epoch": str(facts.batches_per_epoch),
        "ss_num_train_images": str(facts.num_train_images),
        "ss_num_reg_images": str(facts.num_reg_images),
        "ss_gradient_accumulation_steps": str(cfg.training.gradient_accumulation_steps),
        "ss_mixed_precision": facts.mixed_precision,
        "ss_resolution": f"({w}, {h})",
        "ss_seed": str(cfg.training.seed),
        "ss_clip_skip": str(cfg.training.clip_skip),
        "ss_gradient_checkpointing": str(cfg.training.gradient_checkpointing),
        "ss_training_started_at": repr(facts.started_at),
        "ss_training_finished_at": repr(finished_at),
        "ss_session_id": str(int(facts.started_at)),
        "ss_datasets": json.dumps(facts.datasets),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": facts.architecture,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": cfg.saving.metadata_title or cfg.saving.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished_at)),
        "modelspec.prediction_type": "v" if cfg.model.v_parameterization else "epsilon",
    }
    saving = cfg.saving
    for key, value in (("modelspec.author", saving.metadata_author), ("modelspec.description",
                       saving.metadata_description), ("modelspec.license", saving.metadata_license),
                       ("modelspec.tags", saving.metadata_tags), ("modelspec.trigger_phrase",
                       saving.metadata_trigger_phrase), ("modelspec.usage_hint", saving.metadata_usage_hint),
                       ("ss_training_comment", saving.training_comment)):
        if value:  # kohya writes these only when given
            meta[key] = value
    meta.update(facts.components)
    for key, value in facts.extra.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta
