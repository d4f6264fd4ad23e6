"""kohya's network spelling (`network_module` + `network_args`) mapped onto our network options.

kohya users pick LyCORIS networks with `network_module = "lycoris.kohya"` and
`network_args = ["algo=loha", "conv_dim=4", ...]`. Each argument we support becomes the option
of the same meaning; an argument that would change training in a way we do not implement is an
error, never silently dropped. Arguments that only restate the default ("use_tucker=False") pass.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from library.config import network_kinds
from library.errors import UserError

# The LyCORIS algo names come from the network kinds (library.config.network_kinds); LyCORIS's
# "lora" and "locon" are the same module.
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "none")
# Accepted only at these values: the behaviour we implement.
FIXED = {"use_tucker": _FALSE, "use_scalar": _FALSE, "decompose_both": _FALSE, "train_norm": _FALSE, "bypass_mode": _FALSE, "rs_lora": _FALSE,
         "full_matrix": _FALSE, "unbalanced_factorization": _FALSE, "wd_on_output": _TRUE,
         "preset": ("full",)}
DORA_KEYS = ("dora_wd", "use_dora")


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.split(",") if v.strip())


def _weights(value: str) -> tuple[float, ...] | str:
    """down/up_lr_weight: "1,0.5,..." or a curve name ("sine+0.5"), checked by the config."""
    try:
        return _floats(value)
    except ValueError:
        return value


# networks.lora's arguments with an option of the same name and meaning
_BLOCK_ARGS = {"block_dims": _ints, "block_alphas": _floats, "conv_block_dims": _ints,
               "conv_block_alphas": _floats, "down_lr_weight": _weights, "mid_lr_weight": _floats,
               "up_lr_weight": _weights, "block_lr_zero_threshold": float, "loraplus_lr_ratio": float,
               "loraplus_unet_lr_ratio": float, "loraplus_text_encoder_lr_ratio": float, "rank_dropout": float,
               "module_dropout": float}


def mapped() -> dict[str, tuple[str, Any]]:
    """network argument -> (option, parser), the kinds' own options included."""
    kinds = {o.arg: (o.name, o.parse) for o in network_kinds.kind_options().values()}
    return {"conv_dim": ("conv_dim", int), "conv_alpha": ("conv_alpha", float), **kinds,
            "dropout": ("network_dropout", float), **{k: (k, p) for k, p in _BLOCK_ARGS.items()}}


def parse_pairs(args: tuple[str, ...], where: str) -> dict[str, str]:
    out = {}
    for item in args:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f'{where}: expected "key=value" strings, got {item!r}')
        out[key.strip().lower()] = value.strip().strip("\"'")
    return out


def _bool(value: str, where: str, key: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UserError(f"{where}: {key}: expected True or False, got {value!r}")


def apply_network_args(net: Any, explicit: Mapping[str, str], where_args: str) -> Any:
    """`net` (NetworkOptions) with its network_args mapped; `explicit` = {option: where} of the
    options the user set directly, which must agree with the arguments."""
    pairs = parse_pairs(net.network_args, where_args)
    if net.network_module == "networks.lora" and "algo" in pairs:
        raise UserError(f'{where_args}: algo needs network_module = "lycoris.kohya" (networks.lora is plain LoRA)')
    changes: dict[str, Any] = {}
    algo = pairs.pop("algo", None)
    dora = any(_bool(pairs.pop(k), where_args, k) for k in DORA_KEYS if k in pairs)
    algorithms = network_kinds.algorithms()
    if algo is not None:
        if algo.lower() not in algorithms:
            raise UserError(f"{where_args}: algo={algo} is not supported; valid: {', '.join(algorithms)} "
                            "(with dora_wd=True for DoRA)")
        changes["network_type"] = algorithms[algo.lower()]
    if dora:
        kind = network_kinds.network_kind(changes.get("network_type", network_kinds.DEFAULT_KIND))
        if kind.dora is None:
            with_dora = [a for k in network_kinds.network_kinds() if k.dora not in (None, k.name) for a in k.algos]
            raise UserError(f"{where_args}: dora_wd=True works with algo={'/'.join(with_dora)} only (peft has no "
                            f"DoRA for {kind.name})")
        changes["network_type"] = kind.dora
    arguments = mapped()
    for key, value in pairs.items():
        if key in arguments:
            option, parse = arguments[key]
            try:
                changes[option] = parse(value)
            except ValueError:
                kind = {int: "an integer", _ints: "comma-separated integers", _floats: "comma-separated numbers"}.get(
                    parse, "a number")
                raise UserError(f"{where_args}: {key}: expected {kind}, got {value!r}") from None
        elif key in FIXED:
            if value.lower() not in FIXED[key]:
                raise UserError(f"{where_args}: {key}={value} is not supported (accepted: {key}="
                                f"{FIXED[key][0]})")
        else:
            valid = ["algo", *DORA_KEYS, *arguments, *FIXED]
            raise UserError(f"{where_args}: unknown network argument {key!r}; valid: {', '.join(valid)}")
    for option, value in changes.items():
        if option in explicit and getattr(net, option) != value:
            raise UserError(f"{where_args}: sets {option} = {value!r} but {explicit[option]} = "
                            f"{getattr(net, option)!r}; keep one of them")
    return replace(net, **changes) if changes else net
