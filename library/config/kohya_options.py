"""The answer to every option of kohya sd-scripts' LoRA training (and the keys the kohya_ss GUI adds).

kohya users bring the flat TOML that `--config_file` reads (the kohya_ss GUI writes one for every
run). Each of its keys gets one of four answers here, and nothing in such a file is an "unknown
option":

- supported: an option of the same name and meaning in library.config.options or the dataset
  schema (those are not repeated here; `describe` looks them up);
- mapped: turned into our options (`xformers = true` -> `attention = "xformers"`) or into a dataset
  default (kohya reads dataset keys from the command line as the last fallback below [general]);
- no effect: it only tunes kohya's own machinery; accepted, and one info line per run lists them;
- refused when it would change training in a way this trainer does not implement: one line naming
  the key and why. Its inactive values (false, 0, "", [], kohya's default) pass silently, because
  the GUI and `--output_config` write them.

The loader (library.config.loader) reads this table; tools/update_config_docs.py writes it into
docs/configuration.md; tests/test_kohya_compat.py checks it against the argparse options of
sd-scripts (sd_scripts_options.txt beside this module) so a new sd-scripts option cannot go unanswered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from library.config.options import OPTIMIZER_NAMES
from library.errors import UserError

SUPPORTED, MAPPED, NO_EFFECT, REFUSED = "supported", "mapped", "no effect", "refused"


@dataclass(frozen=True)
class KohyaKey:
    name: str
    answer: str                       # MAPPED, NO_EFFECT or REFUSED
    note: str                         # what it becomes / why it has no effect / why it is refused
    # MAPPED: (value, every kohya key of the file) -> {our option: value}; a dataset default is
    # returned as {"dataset:<key>": value}
    to: Callable[[Any, dict], dict] | None = None
    # values at which the key is harmless whatever its answer (kohya's default and "off")
    inactive: tuple = (None, False, 0, "", ())
    gui: bool = False                 # written by the kohya_ss GUI, not an sd-scripts option
    extra: dict = field(default_factory=dict)

    def is_inactive(self, value: Any) -> bool:
        if isinstance(value, list):
            value = tuple(value)
        for off in self.inactive:
            same = value is off if isinstance(value, bool) or isinstance(off, bool) else value == off
            if same:
                return True
        return False


def _opt(name: str, value: Any = None) -> Callable[[Any, dict], dict]:
    """Maps to our option `name`, with the kohya value or a fixed one."""
    return lambda v, keys: {name: v if value is None else value}


def _dataset(name: str) -> Callable[[Any, dict], dict]:
    return lambda v, keys: {f"dataset:{name}": v}


def _resolution(value: Any, keys: dict) -> dict:
    # argparse spelling: "512" or "512,768" (width, height)
    if isinstance(value, str):
        try:
            value = [int(p) for p in value.replace(" ", "").split(",") if p]
        except ValueError:
            raise UserError(f"resolution: expected 512, \"512,768\" or [512, 768], got {value!r}") from None
    return {"dataset:resolution": value}


def _mem_eff_attn(value: Any, keys: dict) -> dict:
    # kohya's own memory-efficient attention; PyTorch's sdpa has such a kernel. An explicit
    # xformers/sdpa key picks the kernel instead.
    return {} if keys.get("xformers") or keys.get("sdpa") else {"attention": "sdpa"}


def _save_model_as(value: Any, keys: dict) -> dict:
    if str(value).lower() != "safetensors":
        raise UserError(f"save_model_as = {value!r}: LoRA files are written as .safetensors only (what WebUIs "
                        "load; ckpt/pt files are pickles); set save_model_as = \"safetensors\" or remove it")
    return {}


def _cache_te_to_disk(value: Any, keys: dict) -> dict:
    return {"cache_text_encoder_outputs": True}


def _dataset_repeats(value: Any, keys: dict) -> dict:
    # kohya applies dataset_repeats to fine-tune style (in_json) datasets only
    return {"dataset:num_repeats": value} if keys.get("in_json") else {}


_FAMILY = "an option of a model family this trainer does not train (it trains SD1.x, SD2.x and SDXL)"
_HUB = "uploading to / downloading from the Hugging Face Hub is not built in; upload the saved file yourself"
_DEEPSPEED = "DeepSpeed is not supported (the trainer uses accelerate's DDP)"

KEYS: tuple[KohyaKey, ...] = (
    # --- mapped ---------------------------------------------------------------------------------
    KohyaKey("xformers", MAPPED, 'attention = "xformers"', _opt("attention", "xformers")),
    KohyaKey("sdpa", MAPPED, 'attention = "sdpa"', _opt("attention", "sdpa")),
    KohyaKey("mem_eff_attn", MAPPED, 'attention = "sdpa" (PyTorch\'s memory-efficient kernel), unless xformers or '
             'sdpa is set', _mem_eff_attn),
    KohyaKey("use_8bit_adam", MAPPED, 'optimizer_type = "AdamW8bit"', _opt("optimizer_type", "AdamW8bit")),
    KohyaKey("use_lion_optimizer", MAPPED, 'optimizer_type = "Lion"', _opt("optimizer_type", "Lion")),
    KohyaKey("cache_text_encoder_outputs_to_disk", MAPPED,
             "cache_text_encoder_outputs = true (the cache is kept in memory; encoding is quick)", _cache_te_to_disk),
    KohyaKey("save_state_on_train_end", MAPPED,
             "save_state = true (a state is written with every save, the last one included)", _opt("save_state", True)),
    KohyaKey("save_model_as", MAPPED, '"safetensors": what every file is written as; ckpt, pt and diffusers '
             "formats are refused", _save_model_as),
    KohyaKey("caption_extention", MAPPED, "caption_extension (kohya's old spelling), as a dataset default",
             _dataset("caption_extension")),
    KohyaKey("resolution", MAPPED, 'dataset default resolution ("512,768" = width, height)', _resolution),
    KohyaKey("in_json", MAPPED, "with train_data_dir: one subset with metadata_file = in_json (kohya's fine-tune "
             "style dataset)", lambda v, keys: {}),
    KohyaKey("dataset_repeats", MAPPED, "num_repeats of the in_json dataset", _dataset_repeats),
    # --- no effect: kohya's own machinery ----------------------------------------------------
    KohyaKey("persistent_data_loader_workers", NO_EFFECT, "tunes kohya's data loader; the workers here live for "
             "the whole run anyway"),
    KohyaKey("config_file", NO_EFFECT, "names the file itself (pass it as --config)"),
    KohyaKey("highvram", NO_EFFECT, "kohya's VRAM heuristics; models are placed by their precision here"),
    KohyaKey("lowram", NO_EFFECT, "kohya's loading on machines with little RAM; models load with safetensors' "
             "memory mapping here"),
    KohyaKey("disable_mmap_load_safetensors", NO_EFFECT, "kohya's loader switch"),
    KohyaKey("ddp_gradient_as_bucket_view", NO_EFFECT, "a DDP tuning switch of kohya's"),
    KohyaKey("ddp_static_graph", NO_EFFECT, "a DDP tuning switch of kohya's"),
    KohyaKey("console_log_level", NO_EFFECT, "console logging is set by the trainer"),
    KohyaKey("console_log_file", NO_EFFECT, "console logging is set by the trainer"),
    KohyaKey("console_log_simple", NO_EFFECT, "console logging is set by the trainer"),
    KohyaKey("log_prefix", NO_EFFECT, "log folders are named by the trainer (logging_dir)"),
    KohyaKey("log_tracker_name", NO_EFFECT, "the tracker run is named after output_name"),
    KohyaKey("log_tracker_config", NO_EFFECT, "tracker settings come from the tracker's own config (e.g. wandb's "
             "environment variables)"),
    KohyaKey("log_config", NO_EFFECT, "the resolved config is written next to the logs anyway"),
    KohyaKey("wandb_run_name", NO_EFFECT, "the wandb run is named after output_name"),
    KohyaKey("wandb_api_key", NO_EFFECT, "log in with `wandb login` or WANDB_API_KEY instead"),
    KohyaKey("tokenizer_cache_dir", NO_EFFECT, "tokenizers are read from the base model"),
    KohyaKey("skip_cache_check", NO_EFFECT, "latent cache entries are keyed on what changes them, so checking is "
             "cheap and always done"),
    KohyaKey("cache_info", NO_EFFECT, "image sizes are read from the image headers"),
    KohyaKey("save_last_n_steps_state", NO_EFFECT, "training states are pruned with their LoRA files "
             "(save_last_n_steps)"),
    KohyaKey("save_last_n_epochs_state", NO_EFFECT, "training states are pruned with their LoRA files "
             "(save_last_n_epochs)"),
    KohyaKey("no_metadata", NO_EFFECT, "metadata is always written (WebUIs and the tools read it)"),
    KohyaKey("v2", NO_EFFECT, "the model family is detected from the checkpoint"),
    KohyaKey("resize_interpolation", NO_EFFECT, "images are resized with the trainer's own filter (area "
             "downscaling, bicubic upscaling)"),
    KohyaKey("huggingface_token", NO_EFFECT, "used with huggingface_repo_id only"),
    KohyaKey("huggingface_repo_type", NO_EFFECT, "used with huggingface_repo_id only"),
    KohyaKey("huggingface_repo_visibility", NO_EFFECT, "used with huggingface_repo_id only"),
    KohyaKey("huggingface_path_in_repo", NO_EFFECT, "used with huggingface_repo_id only"),
    KohyaKey("async_upload", NO_EFFECT, "used with huggingface_repo_id only"),
    KohyaKey("zero_stage", NO_EFFECT, "used with deepspeed only"),
    KohyaKey("offload_optimizer_device", NO_EFFECT, "used with deepspeed only"),
    KohyaKey("offload_optimizer_nvme_path", NO_EFFECT, "used with deepspeed only"),
    KohyaKey("offload_param_device", NO_EFFECT, "used with deepspeed only"),
    KohyaKey("offload_param_nvme_path", NO_EFFECT, "used with deepspeed only"),
    KohyaKey("zero3_init_flag", NO_EFFECT, "used with deepspeed only"),
    KohyaKey("zero3_save_16bit_model", NO_EFFECT, "used with deepspeed only"),
    KohyaKey("max_validation_steps", NO_EFFECT, "validation always covers every held-out image"),
    KohyaKey("metadata_thumbnail", NO_EFFECT, "no thumbnail is written (WebUIs show their own previews)"),
    KohyaKey("metadata_merged_from", NO_EFFECT, "describes merged models; a trained LoRA is not one"),
    KohyaKey("metadata_preprocessor", NO_EFFECT, "describes ControlNet-style models; a LoRA has none"),
    KohyaKey("metadata_is_negative_embedding", NO_EFFECT, "describes textual-inversion embeddings"),
    # --- refused when set ----------------------------------------------------------------------
    KohyaKey("network_train_text_encoder_only", REFUSED, "training only the text encoder(s) is not supported; "
             "network_train_unet_only = false trains both"),
    KohyaKey("full_fp16", REFUSED, "fp16 LoRA weights and gradients train unstably; use mixed_precision = \"fp16\" "
             "(or full_bf16 = true with bf16)"),
    KohyaKey("fp16_master_weights_and_gradients", REFUSED, "fp16 master weights are not supported; the LoRA trains "
             "in fp32 (or bf16 with full_bf16)"),
    KohyaKey("fused_backward_pass", REFUSED, "a full fine-tuning memory trick of kohya's; not used for LoRA here"),
    KohyaKey("cpu_offload_checkpointing", REFUSED, _FAMILY),
    KohyaKey("deepspeed", REFUSED, _DEEPSPEED),
    KohyaKey("huggingface_repo_id", REFUSED, _HUB),
    KohyaKey("resume_from_huggingface", REFUSED, _HUB),
    KohyaKey("save_state_to_huggingface", REFUSED, _HUB),
    KohyaKey("save_n_epoch_ratio", REFUSED, "set save_every_n_epochs instead"),
    KohyaKey("output_config", REFUSED, "use --print_config to see the resolved config"),
    KohyaKey("debug_dataset", REFUSED, "use tools/check_dataset.py to look at a dataset"),
    KohyaKey("dataset_class", REFUSED, "custom dataset classes are not supported; use a dataset TOML"),
    KohyaKey("base_weights", REFUSED, "merging other LoRAs into the base before training is not supported; merge "
             "them into the checkpoint first (tools/merge_lora.py)"),
    KohyaKey("base_weights_multiplier", REFUSED, "belongs to base_weights, which is not supported"),
    KohyaKey("dim_from_weights", REFUSED, "set network_dim (and conv_dim) to the ranks of network_weights "
             "(tools/inspect_lora.py shows them)"),
    KohyaKey("initial_epoch", REFUSED, "to continue a run use resume (a saved state) or network_weights"),
    KohyaKey("initial_step", REFUSED, "to continue a run use resume (a saved state) or network_weights"),
    KohyaKey("skip_until_initial_step", REFUSED, "to continue a run use resume (a saved state)"),
    KohyaKey("validate_every_n_epochs", REFUSED, "validation runs by steps: set validate_every_n_steps"),
    KohyaKey("weighted_captions", REFUSED, "prompt weighting ((word:1.2)) in captions is not supported"),
    KohyaKey("scale_weight_norms", REFUSED, "max-norm regularisation of the LoRA weights is not supported"),
    KohyaKey("adaptive_noise_scale", REFUSED, "adaptive noise offset is not supported (noise_offset is)"),
    KohyaKey("noise_offset_random_strength", REFUSED, "a random noise-offset strength is not supported"),
    KohyaKey("ip_noise_gamma_random_strength", REFUSED, "a random input-perturbation strength is not supported"),
    KohyaKey("lr_scheduler_min_lr_ratio", REFUSED, "belongs to kohya's cosine_with_min_lr / warmup_stable_decay "
             "schedules, which are not built in (lr_scheduler_type can name a scheduler class)"),
    KohyaKey("lr_decay_steps", REFUSED, "belongs to kohya's warmup_stable_decay schedule, which is not built in"),
    KohyaKey("lr_scheduler_timescale", REFUSED, "belongs to kohya's inverse_sqrt schedule, which is not built in"),
    KohyaKey("token_warmup_min", REFUSED, "token warm-up is not supported", inactive=(None, 1)),
    KohyaKey("token_warmup_step", REFUSED, "token warm-up is not supported", inactive=(None, 0, 0.0)),
    KohyaKey("color_aug", REFUSED, "colour augmentation is not supported (kohya deprecated it too)"),
    KohyaKey("face_crop_aug_range", REFUSED, "face-crop augmentation is not supported"),
    KohyaKey("conditioning_data_dir", REFUSED, "at the top level: set it in a [[datasets.subsets]] table, where "
             "it is the folder of mask images for masked_loss; ControlNet conditioning images are not supported"),
    # --- keys the kohya_ss GUI writes that sd-scripts does not read ------------------------
    KohyaKey("epoch", NO_EFFECT, "the GUI's own copy of the epoch count (sd-scripts does not read it; "
             "max_train_epochs does)", gui=True),
    KohyaKey("noise_offset_type", NO_EFFECT, "the GUI's choice between noise_offset and multires_noise_*; those "
             "keys themselves are read", gui=True),
    KohyaKey("stop_text_encoder_training", NO_EFFECT, "a GUI field that sd-scripts' LoRA training does not read",
             gui=True),
    KohyaKey("train_inpainting", NO_EFFECT, "a GUI field that sd-scripts' LoRA training does not read", gui=True),
    *(KohyaKey(k, REFUSED, _FAMILY, gui=True) for k in (
        "clip_l", "clip_g", "t5xxl", "ae", "model_type", "guidance_scale", "discrete_flow_shift",
        "model_prediction_type", "split_mode", "t5xxl_max_token_length", "apply_t5_attn_mask",
        "blocks_to_swap", "single_blocks_to_swap", "double_blocks_to_swap", "weighting_scheme", "mode_scale", "t5xxl_device", "t5xxl_dtype", "clip_l_dropout_rate", "clip_g_dropout_rate",
        "t5_dropout_rate", "enable_scaled_pos_embed", "pos_emb_random_crop_rate", "save_clip", "save_t5xxl",
        "text_encoder_batch_size", "mem_eff_save")),
)
TABLE: dict[str, KohyaKey] = {k.name: k for k in KEYS}

# optimizer_type class paths -> our names (kohya also takes "module.Class" for any optimizer)
OPTIMIZER_PATHS = {
    "torch.optim.adamw": "AdamW", "torch.optim.AdamW": "AdamW", "torch.optim.SGD": "SGD",
    "bitsandbytes.optim.AdamW8bit": "AdamW8bit", "bitsandbytes.optim.adamw.AdamW8bit": "AdamW8bit",
    "bitsandbytes.optim.PagedAdamW": "PagedAdamW", "bitsandbytes.optim.PagedAdamW8bit": "PagedAdamW8bit",
    "bitsandbytes.optim.PagedAdamW32bit": "PagedAdamW32bit", "bitsandbytes.optim.Lion8bit": "Lion8bit",
    "bitsandbytes.optim.PagedLion8bit": "PagedLion8bit", "prodigyopt.Prodigy": "Prodigy",
    "lion_pytorch.Lion": "Lion", "transformers.optimization.Adafactor": "Adafactor",
}
# kohya's own optimizer names we do not ship, with the reason
OPTIMIZER_REFUSED = {
    "dadaptation": "D-Adaptation", "dadaptadam": "D-Adaptation", "dadaptadagrad": "D-Adaptation",
    "dadaptadan": "D-Adaptation", "dadaptadanip": "D-Adaptation", "dadaptlion": "D-Adaptation",
    "dadaptsgd": "D-Adaptation", "dadaptadamprepreview": "D-Adaptation", "dadaptadampreprint": "D-Adaptation",
    "sgdnesterov": "SGD with Nesterov momentum", "sgdnesterov8bit": "8-bit SGD with Nesterov momentum",
    "adamwschedulefree": "schedule-free", "radamschedulefree": "schedule-free", "sgdschedulefree": "schedule-free",
}


def optimizer_name(value: Any) -> Any:
    """optimizer_type as kohya writes it (any case, a class path) -> our name, or the class path."""
    if not isinstance(value, str):
        return value
    if value in OPTIMIZER_PATHS:
        return OPTIMIZER_PATHS[value]
    for name in OPTIMIZER_NAMES:  # kohya compares names case-insensitively
        if value.lower() == name.lower():
            return name
    if value.lower() in OPTIMIZER_REFUSED:
        what = OPTIMIZER_REFUSED[value.lower()]
        raise UserError(f"optimizer_type = {value!r}: kohya's {what} optimizers are not built in; name the class "
                        "(\"package.module.Class\", installed) or use AdamW, Prodigy, Lion, Adafactor or SGD")
    return value


OPTION_LIST = Path(__file__).with_name("sd_scripts_options.txt")


def sd_scripts_options() -> list[str]:
    """Every option of sd-scripts' LoRA training (the checked-in list, see its header)."""
    return [line.split()[0] for line in OPTION_LIST.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def describe(name: str, options: set[str], dataset_keys: set[str]) -> tuple[str, str] | None:
    """(answer, what happens) for a kohya key, or None when it has no answer (a gap in the table).
    `options`: our option names; `dataset_keys`: the dataset keys allowed in [general]."""
    if name in TABLE:
        return TABLE[name].answer, TABLE[name].note
    if name in options:
        return SUPPORTED, "the option of the same name"
    if name in dataset_keys:
        return MAPPED, "dataset default below [general] (as kohya reads dataset options from its command line)"
    return None


@dataclass
class Translation:
    settings: dict[str, tuple[Any, str]]    # our option -> (value, where)
    dataset_defaults: dict[str, Any]        # dataset key -> value (below [general])
    no_effect: list[str]                    # "key (why)" of the keys with no effect


def translate(found: dict[str, tuple[Any, str]]) -> Translation:
    """`found`: kohya key (a TABLE key or a dataset key at the top level) -> (value, where)."""
    out = Translation({}, {}, [])
    values = {k: v for k, (v, _) in found.items()}
    for key, (value, where) in found.items():
        if key not in TABLE:  # a dataset key
            out.dataset_defaults[key] = value
            continue
        entry = TABLE[key]
        if entry.answer == REFUSED:
            if not entry.is_inactive(value):
                raise UserError(f"{where}: {entry.note} (kohya option; remove it or set it to "
                                f"{_off(entry)})")
            continue
        if entry.answer == NO_EFFECT:
            if not entry.is_inactive(value):
                out.no_effect.append(f"{key} ({entry.note})")
            continue
        if value is None or value is False:
            continue
        try:
            mapped = entry.to(value, values)
        except UserError as exc:
            raise UserError(f"{where.rsplit(': ', 1)[0]}: {exc}") from None
        for option, val in mapped.items():
            if option.startswith("dataset:"):
                out.dataset_defaults[option.split(":", 1)[1]] = val
            elif option in out.settings and out.settings[option][0] != val:
                raise UserError(f"{where}: sets {option} = {val!r} but {out.settings[option][1]} sets "
                                f"{out.settings[option][0]!r}; keep one of them")
            else:
                out.settings[option] = (val, where)
    return out


def _off(entry: KohyaKey) -> str:
    off = next((v for v in entry.inactive if v not in (None, "", ())), False)
    return "false" if off is False else repr(off)
