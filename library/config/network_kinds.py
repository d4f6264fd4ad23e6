"""The network kinds (network_type): one record per kind, in one table.

A record holds everything the trainer needs to know about a kind as plain data and small
torch-free functions: how kohya's and LyCORIS's spellings select it, which options it reads, the
peft config that builds it, how its file stores a module and what its metadata says. The config
checks options with it before torch loads; library.lora turns the names in it into peft configs
and file modules. Adding a kind is one `register_network_kind(NetworkKind(...))` (plus a file
module class in library.lora when its weight change is new math); docs/architecture.md has the
steps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from library.errors import UserError

DEFAULT_KIND = "lora"       # the default network_type, and the kind of a file module no other kind claims
ALPHA_SUFFIX = "alpha"      # every kind's file may hold one `<module>.alpha` scalar


@dataclass(frozen=True)
class KindOption:
    """A [network] option that only the kinds listing it read (the others need its default)."""
    name: str                          # the NetworkOptions field
    arg: str                           # its name in kohya's network_args
    parse: Callable[[str], Any]        # network_args string -> value
    valid: Callable[[Any], bool]       # accepted values besides the default
    described: str                     # what `valid` accepts, for messages


@dataclass(frozen=True)
class NetworkKind:
    name: str                          # the network_type value
    summary: str                       # what it trains, for --help

    # config: kohya's spelling and the options it reads
    algos: tuple[str, ...]             # LyCORIS `algo=` names in network_args that select it
    dora: str | None = None            # the kind network_args' dora_wd=True turns it into
    options: tuple[KindOption, ...] = ()
    dropout: bool = True               # network_dropout works on it
    # rank_dropout / module_dropout: "hook" (the trainer's hook on the down projection), "peft"
    # (the peft config's own arguments) or None (not available)
    rank_module_dropout: str | None = "hook"
    loraplus: tuple[str, ...] = ()     # file tensor names LoRA+ (loraplus_*_ratio) speeds up

    # training: the peft config class and its arguments from a NetworkSpec (the rank, targets and
    # per-layer rank/alpha patterns are added to them); peft parameter names that differ from the
    # file's tensor names; a check of each layer's (in, out) sizes, raising a UserError
    peft_config: str = "LoraConfig"
    peft_kwargs: Callable[[Any], dict] = lambda spec: {}
    peft_names: Mapping[str, str] = field(default_factory=dict)
    check_layer: Callable[[Any, str, tuple[int, int]], None] | None = None

    # files: the module class (a name in library.lora.weights or library.lora.lycoris, or
    # "package.module:Class"); the tensor names after `<module>.` that mark this kind's modules;
    # the tensor its weight change is linear in (the first one present); whether every module
    # has a rank (LoKr's whole factors have none)
    file_module: str = "LoraModule"
    file_suffixes: tuple[str, ...] = ()
    linear_in: tuple[str, ...] = ()
    ranked: bool = True

    # metadata: ss_network_module, ss_network_args' algo (None: not written, kohya's plain LoRA)
    # and the arguments written after it; saved states: the NetworkSpec fields that identify one
    # besides its type (None: the type is not recorded, as in plain LoRA states before kinds)
    network_module: str = "lycoris.kohya"
    algo: str | None = None
    args: Mapping[str, str] = field(default_factory=dict)
    state_keys: tuple[str, ...] | None = ()

    def option_args(self, net) -> dict[str, str]:
        """ss_network_args of the options only this kind reads."""
        return {o.arg: str(getattr(net, o.name)) for o in self.options}


def _check_lokr_factor(spec, name: str, sizes: tuple[int, int]) -> None:
    """peft and LyCORIS split a size as (factor, size / factor) only when factor divides it, and
    order the two parts alike only when factor <= size / factor; anything else would train a
    layout LyCORIS's loader rebuilds differently, so it is refused."""
    factor = spec.lokr_factor
    if factor == -1:
        return
    for side, size in zip(("inputs", "outputs"), sizes):
        if size % factor:
            raise UserError(f"[network] lokr_factor: {factor} does not divide the {size} {side} of {name}; use a "
                            "factor of every layer size, or -1 (automatic)")
        if factor * factor > size:
            raise UserError(f"[network] lokr_factor: {factor} is above the square root of the {size} {side} of "
                            f"{name} (LyCORIS's loader would split it the other way round); use at most "
                            f"{int(size ** 0.5)}, or -1 (automatic)")


def _lora_kwargs(spec, use_dora: bool = False) -> dict:
    return dict(lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights=True, bias="none",
                use_dora=use_dora)


_LORA_NAMES = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
_LORA_FILE = ("lora_down.weight", "lora_up.weight")
LOKR_FACTOR = KindOption("lokr_factor", "factor", int, lambda v: v == -1 or v >= 1,
                         "-1 (automatic) or a factor >= 1")

BUILT_IN = (
    NetworkKind(
        "lora", "LoRA/LoCon", algos=("lora", "locon"), dora="dora", peft_kwargs=_lora_kwargs,
        loraplus=("lora_up.weight",),
        peft_names=_LORA_NAMES, file_module="LoraModule", file_suffixes=_LORA_FILE,
        linear_in=("lora_up.weight",), network_module="networks.lora", state_keys=None),
    NetworkKind(
        "dora", "LoRA with a trained magnitude per output channel", algos=("dora",), dora="dora",
        rank_module_dropout=None, loraplus=("lora_up.weight",),
        peft_kwargs=lambda spec: _lora_kwargs(spec, use_dora=True),
        peft_names={**_LORA_NAMES, "lora_magnitude_vector": "dora_scale"},
        # a DoRA module wraps the module its other tensors make (LoRA, or LoHa in LyCORIS's files)
        file_module="DoraModule", file_suffixes=("dora_scale",), linear_in=("lora_up.weight",),
        # lokr_factor: the states of every LyCORIS kind have recorded it
        algo="lora", args={"dora_wd": "True"}, state_keys=("lokr_factor",)),
    NetworkKind(
        "loha", "Hadamard product", algos=("loha",), dropout=False, peft_config="LoHaConfig",
        rank_module_dropout="peft",
        # use_effective_conv2d=False: 3x3 kernels flattened into hada_w*_b, LyCORIS's default layout
        peft_kwargs=lambda spec: dict(alpha=spec.alpha, init_weights=True, use_effective_conv2d=False,
                                      rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout),
        file_module="LohaModule",
        file_suffixes=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        linear_in=("hada_w2_b",), algo="loha", state_keys=("lokr_factor",)),
    NetworkKind(
        "lokr", "Kronecker product", algos=("lokr",), options=(LOKR_FACTOR,), dropout=False,
        peft_config="LoKrConfig", rank_module_dropout="peft",
        # LyCORIS's defaults: w1 whole, w2 split when the rank is small; w2 (not w1) starts at zero.
        peft_kwargs=lambda spec: dict(alpha=spec.alpha, init_weights="lycoris", use_effective_conv2d=False,
                                      decompose_both=False, decompose_factor=spec.lokr_factor,
                                      rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout),
        check_layer=_check_lokr_factor, file_module="LokrModule",
        file_suffixes=("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
        linear_in=("lokr_w2", "lokr_w2_b"), ranked=False, algo="lokr", state_keys=("lokr_factor",)),
)


_KINDS: dict[str, NetworkKind] = {}


def register_network_kind(kind: NetworkKind) -> NetworkKind:
    """Add a kind to the table; its name and LyCORIS algo names must be new."""
    if kind.name in _KINDS:
        raise ValueError(f"network kind {kind.name!r} is already registered")
    taken = algorithms()
    clash = [a for a in kind.algos if a in taken]
    if clash:
        raise ValueError(f"network kind {kind.name!r}: algo {clash[0]!r} already selects {taken[clash[0]]!r}")
    _KINDS[kind.name] = kind
    return kind


def unregister_network_kind(name: str) -> None:
    if name == DEFAULT_KIND:
        raise ValueError(f"the default network kind {name!r} cannot be removed")
    del _KINDS[name]


# --- lookups ------------------------------------------------------------------------------------

def network_kinds() -> tuple[NetworkKind, ...]:
    return tuple(_KINDS.values())


def kind_names() -> tuple[str, ...]:
    """The valid network_type values, in table order."""
    return tuple(_KINDS)


def network_kind(name: str) -> NetworkKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise UserError(f"[network] network_type: {name!r} is not one of {', '.join(_KINDS)}") from None


def algorithms() -> dict[str, str]:
    """LyCORIS algo name -> network_type."""
    return {algo: kind.name for kind in _KINDS.values() for algo in kind.algos}


def kind_options() -> dict[str, KindOption]:
    """The options some kinds read, by option name."""
    return {o.name: o for kind in _KINDS.values() for o in kind.options}


def file_suffixes() -> tuple[str, ...]:
    """Every tensor name (after `<module>.`) a file of any kind may hold."""
    return tuple(dict.fromkeys(s for kind in _KINDS.values() for s in kind.file_suffixes)) + (ALPHA_SUFFIX,)


def summary() -> str:
    """`lora (LoRA/LoCon), ... or lokr (Kronecker product)`, for --help."""
    parts = [f"{kind.name} ({kind.summary})" for kind in _KINDS.values()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def option_problem(net) -> str | None:
    """What is wrong with the kind-specific options of `net` (NetworkOptions), or None."""
    defaults = {f.name: f.default for f in dataclasses.fields(net)}
    for name, opt in kind_options().items():
        value = getattr(net, name)
        if value == defaults[name]:
            continue
        owners = [kind.name for kind in _KINDS.values() if any(o.name == name for o in kind.options)]
        if net.network_type not in owners or not opt.valid(value):
            return (f"{name}: {value} is only valid with network_type = " + " or ".join(f'"{o}"' for o in owners)
                    + f", as {opt.described}")
    return None


for _kind in BUILT_IN:
    register_network_kind(_kind)
