"""Build the one read-only Config from a TOML file and command-line overrides.

Everything is validated here, before any model is loaded: unknown keys (with the closest valid
name), wrong types and ranges (with what is allowed), missing required options, missing input
files and refused pickle checkpoints. Each problem is a UserError naming the file, the table and
the key.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from library.config import kohya_options, network_kinds
from library.config.dataset import (
    COMMON, DATASET_LEVEL, DatasetBlueprint, check_dataset_file_keys, folder_blueprint, parse_blueprint,
)
from library.config.network_args import apply_network_args
from library.config.options import (
    AptOptions, DataOptions, FLAT_TABLES, LAYER_ALIASES, LoggingOptions, ModelOptions, NAMED_TABLES, NetworkOptions,
    OPTIMIZER_NAMES,
    OptimizerOptions, SamplingOptions, SavingOptions, TrainingOptions,
)
from library.config.paths import looked_in, resolve_input
from library.config.schema import (
    CoercionError, OptionInfo, check_bounds, closest, coerce, options_of, with_choice_case,
)
from library.errors import UserError

DATASET_TABLES = ("general", "datasets")
NETWORK_OPTION_NAMES = tuple(options_of(NetworkOptions, "network"))
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Config:
    model: ModelOptions
    network: NetworkOptions
    optimizer: OptimizerOptions
    training: TrainingOptions
    data: DataOptions
    saving: SavingOptions
    sampling: SamplingOptions
    logging: LoggingOptions
    apt: AptOptions
    dataset: DatasetBlueprint | None
    config_file: str | None = None
    # kohya options that were accepted but change nothing here: "key (why)", for one info line
    kohya_no_effect: tuple[str, ...] = ()


def all_options() -> dict[str, OptionInfo]:
    """Every option by its command-line name (`name` for flat tables, `table.name` for named ones)."""
    out: dict[str, OptionInfo] = {}
    for table, cls in FLAT_TABLES.items():
        for name, info in options_of(cls, table).items():
            assert name not in out, f"option {name} declared twice"
            out[name] = info
    for table, cls in NAMED_TABLES.items():
        for name, info in options_of(cls, table).items():
            out[f"{table}.{name}"] = info
    return out


@dataclass
class _Setting:
    value: Any
    origin: str  # "file" or "cli"
    where: str   # for messages: "cfg.toml: [network] network_dim" or "command line: --network_dim"


def read_toml(path: Path, what: str = "config") -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; expected a {what} .toml file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the {what} file as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None


def _unknown(name: str, where: str, candidates: list[str], what: str = "option") -> UserError:
    hint = closest(name, candidates)
    return UserError(f"{where}: unknown {what}" + (f"; did you mean {hint}?" if hint else "; run with --help for the list"))


KOHYA_DATASET_KEYS = set(COMMON) | set(DATASET_LEVEL)


def is_kohya_key(name: str) -> bool:
    """A key of kohya's flat training config that is not one of our options (library.config.kohya_options)."""
    return name in kohya_options.TABLE or name in KOHYA_DATASET_KEYS


def _is_kohya_section(key: str, value: Any) -> bool:
    # kohya flattens every table of its training config; its examples name them "*_arguments"
    return isinstance(value, dict) and key.endswith("_arguments") and key not in FLAT_TABLES


def _collect_file(doc: dict, source: str, options: dict[str, OptionInfo]
                  ) -> tuple[dict[str, _Setting], dict[str, tuple[Any, str]]]:
    """Our options, and the kohya keys (for library.config.kohya_options.translate), by name."""
    settings: dict[str, _Setting] = {}
    kohya: dict[str, tuple[Any, str]] = {}
    flat_names = [n for n in options if "." not in n]
    tables = list(FLAT_TABLES) + list(NAMED_TABLES) + list(DATASET_TABLES)

    def put(name: str, value: Any, where: str) -> None:
        if name in settings or name in kohya:
            first = settings[name].where if name in settings else kohya[name][1]
            raise UserError(f"{where}: set twice (also at {first.split(': ', 1)[1]})")
        settings[name] = _Setting(value, "file", where)

    def put_kohya(name: str, value: Any, where: str) -> None:
        if name in kohya or name in settings:
            first = settings[name].where if name in settings else kohya[name][1]
            raise UserError(f"{where}: set twice (also at {first.split(': ', 1)[1]})")
        kohya[name] = (value, where)

    for key, value in doc.items():
        if key in DATASET_TABLES:
            continue
        if key == "subsets":
            check_dataset_file_keys({key: value}, source)  # the one message for [[subsets]] at the top level
        if key in FLAT_TABLES and isinstance(value, dict):
            for name, val in value.items():
                where = f"{source}: [{key}] {name}"
                info = options.get(name)
                if info is None and is_kohya_key(name):
                    put_kohya(name, val, where)
                    continue
                if info is None or "." in name:
                    raise _unknown(name, where, [n for n in flat_names if options[n].table == key] + flat_names)
                if info.table != key:
                    raise UserError(f"{where}: belongs in [{info.table}] (or at the top level), not in [{key}]")
                put(name, val, where)
        elif key in NAMED_TABLES and isinstance(value, dict):
            for name, val in value.items():
                where = f"{source}: [{key}] {name}"
                if f"{key}.{name}" not in options:
                    raise _unknown(name, where, [n.split(".", 1)[1] for n in options if n.startswith(key + ".")])
                put(f"{key}.{name}", val, where)
        elif _is_kohya_section(key, value):
            for name, val in value.items():
                where = f"{source}: [{key}] {name}"
                if name in flat_names:
                    put(name, val, where)
                elif is_kohya_key(name):
                    put_kohya(name, val, where)
                else:
                    raise _unknown(name, where, flat_names)
        elif key in flat_names and not isinstance(value, dict):
            put(key, value, f"{source}: [{options[key].table}] {key}")
        elif is_kohya_key(key) and not isinstance(value, dict):
            put_kohya(key, value, f"{source}: {key}")
        elif isinstance(value, dict):
            raise _unknown(key, f"{source}: [{key}]", tables, "table")
        else:
            raise _unknown(key, f"{source}: {key}", flat_names + tables)
    return settings, kohya


def _cli_value(raw: str) -> Any:
    """A kohya key's command-line string as the TOML value it stands for ("true", "0.5", "[1, 2]")."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_kohya(settings: dict[str, _Setting], kohya: dict[str, tuple[Any, str]]) -> kohya_options.Translation:
    """kohya's keys become our options (conflicts with an option set directly are errors)."""
    found = kohya_options.translate(kohya)
    for option, (value, where) in found.settings.items():
        own = settings.get(option)
        if own is not None and own.origin == "file" and where.startswith("command line"):
            own = None  # a kohya key on the command line overrides the file's option
        if own is not None:
            if own.value != value and not (own.origin == "cli"):
                raise UserError(f"{where}: sets {option} = {value!r} but {own.where} = {own.value!r}; keep one "
                                "of them")
            continue  # the option set directly (or on the command line) wins
        settings[option] = _Setting(value, "file", where)
    if "optimizer_type" in settings:
        setting = settings["optimizer_type"]
        try:
            setting.value = kohya_options.optimizer_name(setting.value)
        except UserError as exc:
            raise UserError(f"{setting.where}: {exc}") from None
    return found


def _build_table(cls: type, table: str, prefix: str, settings: dict[str, _Setting], source: str):
    values = {}
    for name, info in options_of(cls, table).items():
        setting = settings.get(prefix + name)
        if setting is None:
            if info.required:
                raise UserError(
                    f"{source}: [{table}] {name}: required option missing; "
                    f"set it in [{table}] or pass --{prefix}{name}"
                )
            continue
        try:
            value = with_choice_case(coerce(setting.value, info.type, from_cli=setting.origin == "cli"), info)
            check_bounds(value, info)
        except CoercionError as exc:
            raise UserError(f"{setting.where}: expected {info.describe_allowed()}, {exc}") from None
        values[name] = value
    return cls(**values)


# Options that name input files: (table, option, what it is).
INPUT_PATHS = (
    ("model", "pretrained_model_name_or_path", "model file or folder"),
    ("model", "vae", "VAE file or folder"),
    ("model", "model_config", "config folder"),
    ("network", "network_weights", "LoRA file"),
    ("data", "dataset_config", "dataset config file"),
    ("data", "train_data_dir", "image folder"),
    ("data", "reg_data_dir", "regularisation image folder"),
    ("sampling", "sample_prompts", "sample prompts file"),
)


def _resolve_inputs(values: dict, settings: dict[str, _Setting], base_dir: Path | None) -> None:
    """Make input paths concrete and check they exist, naming the option that pointed there."""
    allow_pickle = values["model"].allow_pickle
    for table, name, what in INPUT_PATHS:
        value = getattr(values[table], name)
        if value is None:
            continue
        setting = settings[name]
        base = base_dir if setting.origin == "file" else None
        path = Path(resolve_input(value, base))
        if not path.exists():
            raise UserError(f"{setting.where}: no such {what}: {value}{looked_in(value, base)}")
        _check_not_pickle(path, name, setting.where, allow_pickle)
        values[table] = replace(values[table], **{name: str(path)})


# Options naming weights files: anything there that is not safetensors is loaded as a pickle.
WEIGHT_FILES = ("pretrained_model_name_or_path", "vae", "network_weights")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch's zip format, a bare pickle (protocol 2 and later)


def _looks_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(_PICKLE_MAGIC)


def _check_not_pickle(path: Path, name: str, where: str, allow_pickle: bool) -> None:
    """Pickles can run code when loaded: refused unless allowed, whatever their file is called."""
    refused = (f"which can run arbitrary code when loaded; convert it to .safetensors, or set allow_pickle = true if "
               "you trust its source")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"{where}: {path.name} is a pickle checkpoint, {refused}")
        return
    if name not in WEIGHT_FILES or not path.is_file():
        return
    if path.suffix.lower() == ".safetensors":
        if _looks_like_pickle(path):  # a renamed .ckpt: never handed to a loader that might unpickle it
            raise UserError(f"{where}: {path.name} holds a pickle (a renamed .ckpt or .pt), not safetensors data; "
                            "pickles can run arbitrary code when loaded, so it is not read: convert the original "
                            "checkpoint to .safetensors")
    elif not allow_pickle:
        raise UserError(f"{where}: {path.name} is not a .safetensors file; other checkpoint files are loaded as "
                        f"pickles, {refused}")


def _class_path(value: str) -> bool:
    parts = value.split(".")
    return len(parts) >= 2 and all(p.isidentifier() for p in parts)


def _cross_checks(values: dict, source: str) -> None:
    opt: OptimizerOptions = values["optimizer"]
    if opt.optimizer_type not in OPTIMIZER_NAMES and not _class_path(opt.optimizer_type):
        hint = closest(opt.optimizer_type, OPTIMIZER_NAMES)
        raise UserError(f"{source}: [optimizer] optimizer_type: {opt.optimizer_type!r} is not "
                        + (f"an optimizer; did you mean {hint}?" if hint else
                           f"one of {', '.join(OPTIMIZER_NAMES)} or a class path such as \"torch.optim.RAdam\""))
    if opt.lr_scheduler_type is not None and not _class_path(opt.lr_scheduler_type):
        raise UserError(f"{source}: [optimizer] lr_scheduler_type: expected a class path such as "
                        f"\"torch.optim.lr_scheduler.CosineAnnealingLR\", got {opt.lr_scheduler_type!r}")
    net: NetworkOptions = values["network"]
    train: TrainingOptions = values["training"]
    if net.conv_alpha is not None and net.conv_dim is None:
        raise UserError(f"{source}: [network] conv_alpha: set conv_dim too (conv_alpha alone trains nothing)")
    for key, bad in (("conv_dim", net.conv_dim is not None and net.conv_dim < 1),
                     ("conv_alpha", net.conv_alpha is not None and net.conv_alpha <= 0),
                     ("network_dropout", not 0 <= net.network_dropout < 1)):
        if bad:  # values that came through network_args skip the option bounds
            raise UserError(f"{source}: [network] {key}: {getattr(net, key)} is out of range")
    problem = network_kinds.option_problem(net)
    if problem:
        raise UserError(f"{source}: [network] {problem}")
    kind = network_kinds.network_kind(net.network_type)
    _check_block_options(net, kind, source)
    if net.network_dropout and not kind.dropout:
        raise UserError(f"{source}: [network] network_dropout: {kind.name} has no dropout on its input (peft's "
                        f"{kind.peft_config.removesuffix('Config')} layers); set it to 0")
    fp8 = "fp8_base" if train.fp8_base else "fp8_base_unet" if train.fp8_base_unet else None
    if fp8 and kind.dora == kind.name:
        raise UserError(f"{source}: [training] {fp8}: {kind.name} scales the base weight itself (peft reads it "
                        "unquantised); use another network_type or set it to false")
    if train.min_timestep >= train.max_timestep:
        raise UserError(f"{source}: [training] min_timestep ({train.min_timestep}) must be below max_timestep "
                        f"({train.max_timestep})")
    if train.scale_v_pred_loss_like_noise_pred and not values["model"].v_parameterization:
        raise UserError(f"{source}: [training] scale_v_pred_loss_like_noise_pred: only for v-prediction; set "
                        "v_parameterization = true or remove it")
    sampling_of = {"logit_mean": ("logit_normal",), "logit_std": ("logit_normal",),
                   "sigmoid_scale": ("sigmoid", "shift"), "timestep_shift": ("shift",)}
    for key, modes in sampling_of.items():
        if train.timestep_sampling not in modes and getattr(train, key) != TrainingOptions.__dataclass_fields__[
                key].default:
            raise UserError(f"{source}: [training] {key}: used only with timestep_sampling = "
                            + " or ".join(f'"{m}"' for m in modes) + f' (this run has "{train.timestep_sampling}")')
    if train.full_bf16 and train.mixed_precision not in ("bf16", "auto"):
        raise UserError(f"{source}: [training] full_bf16 needs mixed_precision = \"bf16\"")
    warmup = values["optimizer"].lr_warmup_steps
    if isinstance(warmup, float) and warmup >= 1 and not warmup.is_integer():
        raise UserError(f"{source}: [optimizer] lr_warmup_steps: expected a whole number of steps or a fraction "
                        f"below 1, got {warmup}")
    apt: AptOptions = values["apt"]
    for key in ("rs_layers", "aa_layers"):
        for selector in getattr(apt, key):
            if selector not in LAYER_ALIASES and not selector.startswith(
                    ("down_blocks", "mid_block", "up_blocks")):
                raise UserError(f"{source}: [apt] {key}: {selector!r} is not a layer selector; use \"all\", "
                                "\"down\", \"mid\", \"up\" or a path prefix such as \"up_blocks.1\"")
    if train.apt and apt.augment and apt.augment_space == "pixel" and (
            values["data"].cache_latents or values["data"].cache_latents_to_disk):
        raise UserError(f"{source}: [apt] augment_space = \"pixel\" transforms images before the VAE, so it cannot "
                        "be combined with cache_latents; use augment_space = \"latent\" or turn caching off")
    _check_output_name(values["saving"].output_name, source)
    sampling: SamplingOptions = values["sampling"]
    if (sampling.sample_every_n_steps or sampling.sample_every_n_epochs or sampling.sample_at_first) \
            and not sampling.sample_prompts:
        raise UserError(f"{source}: [sampling] sample_prompts: needed to make sample images (a prompts file)")


LR_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def _check_block_options(net: NetworkOptions, kind, source: str) -> None:
    """networks.lora's block, LoRA+ and dropout options (their lengths are checked against the
    model's blocks when the network is built)."""
    for key in ("down_lr_weight", "up_lr_weight"):
        value = getattr(net, key)
        if isinstance(value, str):
            name, _, plus = value.partition("+")
            ok = name in LR_CURVES
            if ok and plus:
                try:
                    float(plus)
                except ValueError:
                    ok = False
            if not ok:
                raise UserError(f"{source}: [network] {key}: {value!r} is not a list of factors or a curve; use "
                                f"{', '.join(LR_CURVES)}, optionally with \"+0.5\" (e.g. \"sine+0.5\")")
    for key in ("rank_dropout", "module_dropout", "block_lr_zero_threshold"):
        value = getattr(net, key)
        if not 0 <= value < (1 if key != "block_lr_zero_threshold" else float("inf")):
            raise UserError(f"{source}: [network] {key}: {value} is out of range")
    for key in ("block_dims", "conv_block_dims", "block_alphas", "conv_block_alphas", "mid_lr_weight",
                "down_lr_weight", "up_lr_weight"):
        value = getattr(net, key)
        if isinstance(value, tuple) and any(v < 0 for v in value):
            raise UserError(f"{source}: [network] {key}: negative values are not valid")
    if (net.block_alphas is not None and net.block_dims is None) or \
            (net.conv_block_alphas is not None and net.conv_block_dims is None):
        key = "block_alphas" if net.block_dims is None and net.block_alphas is not None else "conv_block_alphas"
        raise UserError(f"{source}: [network] {key}: set {key.replace('alphas', 'dims')} too")
    if (net.rank_dropout or net.module_dropout) and kind.rank_module_dropout is None:
        key = "rank_dropout" if net.rank_dropout else "module_dropout"
        with_it = [k.name for k in network_kinds.network_kinds() if k.rank_module_dropout]
        raise UserError(f"{source}: [network] {key}: not available with network_type = \"{kind.name}\"; use "
                        + " or ".join(with_it))
    plus = [k for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
            if getattr(net, k) is not None]
    if plus and not kind.loraplus:
        with_it = [k.name for k in network_kinds.network_kinds() if k.loraplus]
        raise UserError(f"{source}: [network] {plus[0]}: LoRA+ speeds up the up matrices of "
                        f"{' and '.join(with_it)}; {kind.name} has none")


def _check_output_name(name: str, source: str) -> None:
    """output_name is a file name inside output_dir: a path in it would write elsewhere."""
    bad = None
    if not name.strip():
        bad = "is empty"
    elif "/" in name or "\\" in name:
        bad = "contains a path separator"
    elif name.strip(".") == "":
        bad = "is not a file name"
    elif any(ord(c) < 32 for c in name):
        bad = "contains a control character"
    if bad:
        raise UserError(f"{source}: [saving] output_name: {name!r} {bad}; give a plain file name without folders "
                        "(e.g. \"my_lora\"; the folder is output_dir)")


def build_config(config_file: str | None, overrides: list[tuple[str, str]], *, need_dataset: bool = True) -> Config:
    """`overrides` are (name, raw string) pairs from the command line, in order."""
    options = all_options()
    base_dir = None
    doc: dict = {}
    source = "command line"
    if config_file is not None:
        path = Path(config_file)
        doc = read_toml(path)
        source = str(path)
        base_dir = path.resolve().parent
    settings, kohya = _collect_file(doc, source, options)
    for name, raw in overrides:
        where = f"command line: --{name}"
        key = name
        if key not in options and "." in key and key.split(".", 1)[0] in FLAT_TABLES:
            key = key.split(".", 1)[1]  # --network.network_dim works too
        if key not in options and is_kohya_key(key):
            kohya[key] = (_cli_value(raw), where)
            continue
        if key not in options:
            raise _unknown(name, where, list(options))
        settings[key] = _Setting(raw, "cli", where)
    translation = _apply_kohya(settings, kohya)

    values: dict[str, Any] = {}
    for table, cls in FLAT_TABLES.items():
        values[table] = _build_table(cls, table, "", settings, source)
    for table, cls in NAMED_TABLES.items():
        values[table] = _build_table(cls, table, f"{table}.", settings, source)
    if values["network"].network_args:
        explicit = {k: s.where for k, s in settings.items() if k in NETWORK_OPTION_NAMES}
        values["network"] = apply_network_args(values["network"], explicit, settings["network_args"].where)
    _cross_checks(values, source)
    _resolve_inputs(values, settings, base_dir)

    blueprint = None
    inline = any(k in doc for k in DATASET_TABLES)
    data: DataOptions = values["data"]
    if data.dataset_config and inline:
        raise UserError(f"{source}: both dataset_config and inline [[datasets]] tables are set; keep one of them")
    if data.reg_data_dir and not data.train_data_dir:
        raise UserError(f"{source}: [data] reg_data_dir: needs train_data_dir (the folder convention)")
    if data.train_data_dir and (data.dataset_config or "datasets" in doc):
        raise UserError(f"{source}: [data] train_data_dir: set either train_data_dir or a dataset "
                        "([[datasets]] / dataset_config), not both")
    defaults = translation.dataset_defaults
    defaults_where = f"{source}: top-level dataset keys (kohya's fallback below [general])"
    in_json = kohya.get("in_json", (None, ""))[0]
    if in_json and not data.train_data_dir:
        raise UserError(f"{kohya['in_json'][1]}: needs train_data_dir (the folder of the images it describes)")
    if data.train_data_dir and in_json:
        meta = resolve_input(in_json, base_dir if kohya["in_json"][1].startswith(source) else None)
        if not Path(meta).exists():
            raise UserError(f"{kohya['in_json'][1]}: no such metadata file: {in_json}{looked_in(in_json, base_dir)}")
        blueprint = parse_blueprint({"general": doc.get("general", {}), "datasets": [
            {"subsets": [{"image_dir": data.train_data_dir, "metadata_file": meta}]}]}, source, Path.cwd(),
            defaults, defaults_where)
    elif data.train_data_dir:
        blueprint = folder_blueprint(data.train_data_dir, data.reg_data_dir, doc.get("general", {}), source,
                                     defaults, defaults_where)
    elif data.dataset_config:
        ds_path = Path(data.dataset_config)
        ds_doc = read_toml(ds_path, "dataset config")
        check_dataset_file_keys(ds_doc, str(ds_path))
        blueprint = parse_blueprint(ds_doc, str(ds_path), ds_path.resolve().parent, defaults, defaults_where)
    elif inline:
        blueprint = parse_blueprint(doc, source, base_dir or Path.cwd(), defaults, defaults_where)
    elif need_dataset:
        raise UserError(f"{source}: no dataset; set dataset_config = \"dataset.toml\", add [[datasets]] tables "
                        "with [[datasets.subsets]] image_dir = \"...\", or use train_data_dir")
    if blueprint is not None:
        for ds in blueprint.datasets:
            for sub in ds.subsets:
                for key in ("image_dir", "metadata_file"):
                    value = getattr(sub, key)
                    if value and not Path(value).exists():
                        raise UserError(f"{blueprint.source}: [[datasets]] #{ds.index + 1} [[datasets.subsets]] "
                                        f"#{sub.index + 1}: {key}: no such path: {value}")
    if blueprint is not None:
        _dataset_checks(blueprint, values)
    return Config(dataset=blueprint, config_file=config_file, kohya_no_effect=tuple(translation.no_effect),
                  **{t: values[t] for t in list(FLAT_TABLES) + list(NAMED_TABLES)})


CAPTION_RANDOMISERS = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                       "caption_dropout_every_n_epochs", "enable_wildcard")


def _dataset_checks(blueprint: DatasetBlueprint, values: dict) -> None:
    """Dataset settings that contradict the caching options."""
    data: DataOptions = values["data"]
    for ds in blueprint.datasets:
        for sub in ds.subsets:
            where = f"{blueprint.source}: [[datasets]] #{ds.index + 1} [[datasets.subsets]] #{sub.index + 1}"
            if sub.random_crop and (data.cache_latents or data.cache_latents_to_disk):
                raise UserError(f"{where}: random_crop cannot be combined with cache_latents (a cached latent has "
                                "one fixed crop); turn one of them off")
            if not data.cache_text_encoder_outputs:
                continue
            for key in CAPTION_RANDOMISERS:
                if getattr(sub, key):
                    raise UserError(f"{where}: {key} changes captions during training, so cache_text_encoder_outputs "
                                    "cannot be used; turn one of them off")
    if data.cache_text_encoder_outputs and not values["network"].network_train_unet_only:
        raise UserError(f"{blueprint.source}: cache_text_encoder_outputs cannot be used while training the text "
                        "encoders (network_train_unet_only = false)")


def table_fields(cfg: Config) -> dict[str, dict[str, Any]]:
    """The resolved options by table, for --print_config and metadata."""
    return {table: {f.name: getattr(getattr(cfg, table), f.name) for f in fields(cls)}
            for table, cls in list(FLAT_TABLES.items()) + list(NAMED_TABLES.items())}
