"""The `kiln` command. Each subcommand is a Hydra application over `hydra_conf/`.

`kiln <subcommand> [overrides]` composes `hydra_conf/<subcommand>.yaml` with ordinary Hydra
overrides (`key=value`, `group=option`, `-m`, `--cfg job`, `--help`), turns the result into the
typed `KilnConfig` once, validates it, and hands it to the subcommand's handler. Handlers are
imported lazily so `kiln plan` does not pay for importing Ray, DeepSpeed or torch, nor does
the process that only starts torchrun for `kiln train` import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

NOT_BUILT_EXIT_CODE = 2
CONFIG_ERROR_EXIT_CODE = 1


@dataclass(frozen=True)
class Subcommand:
    """One `kiln` subcommand.

    Args:
        summary: one line for `kiln --help`.
        handler: "module:function" taking a `KilnConfig` and returning an exit code, or None
            while the capability is not built.
        pending: what is missing, printed when `handler` is None.
    """

    summary: str
    handler: str | None = None
    pending: str = ""


SUBCOMMANDS: dict[str, Subcommand] = {
    "data": Subcommand(
        "clean, deduplicate, tokenize (SentencePiece) and shard a corpus with Ray workers",
        handler="data_pipeline.pipeline:run",
    ),
    "train": Subcommand(
        "pretrain a decoder, encoder or encoder-decoder with DeepSpeed ZeRO, FSDP2 or DDP",
        handler="pretrain.train:run",
    ),
    "launch": Subcommand(
        "run the same train or data job on cluster=local, slurm or ray",
        handler="launch.launcher:run",
    ),
    "plan": Subcommand(
        "parameters, FLOPs/token, Chinchilla tokens, memory per GPU per ZeRO stage/FSDP, fit, time",
        handler="pretrain.plan:run",
    ),
    "export": Subcommand(
        "convert a checkpoint into a Hugging Face transformers directory",
        handler="pretrain.export:run",
    ),
    "report": Subcommand(
        "summarise a data build or a training run (tokens, losses, throughput, MFU)",
        handler="pretrain.report:run",
    ),
}


def format_help() -> str:
    """The text of `kiln --help`."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: kiln <subcommand> [key=value | group=option ...] [-m] [--cfg job] [--help]",
        "",
        "kiln: distributed pretraining orchestration (Ray data workers, DeepSpeed/FSDP trainers,",
        "Hydra configs, launched locally, on Slurm or on Ray).",
        "",
        "subcommands:",
    ]
    lines += [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    lines += [
        "",
        "Each subcommand is a Hydra application over hydra_conf/; `kiln <subcommand> --help`",
        "lists its config groups and options. Example: kiln plan model=llama_8b cluster.nodes=8",
    ]
    return "\n".join(lines)


def load_handler(spec: str) -> Callable[..., int | None]:
    module_name, function_name = spec.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def run_subcommand(name: str, args: Sequence[str]) -> None:
    """Run `kiln <name> <args>` as a Hydra application (Hydra reads `sys.argv`)."""
    import hydra
    from omegaconf import DictConfig

    from pretrain.config import ConfigError, build_config, register_configs

    register_configs()
    subcommand = SUBCOMMANDS[name]
    sys.argv = [f"kiln-{name}", *args]

    @hydra.main(config_path="pkg://hydra_conf", config_name=name, version_base="1.3")
    def app(raw: DictConfig) -> None:
        composed()  # Hydra composed the config: its output from here on is the command's
        try:
            cfg = build_config(raw)
        except ConfigError as error:
            print(f"kiln {name}: config error: {error}", file=sys.stderr)
            sys.exit(CONFIG_ERROR_EXIT_CODE)
        if name == "train" and cfg.job != "train":
            print(f"kiln train: config error: job={cfg.job} is kiln launch's choice of what to "
                  f"run; for a {cfg.job} job use kiln {cfg.job}", file=sys.stderr)  # fmt: skip
            sys.exit(CONFIG_ERROR_EXIT_CODE)
        if name in ("train", "data"):
            from launch.launcher import sweep_point

            sweep_point(cfg, name)  # under -m, each point in its own directory (as kiln launch)
        if subcommand.handler is None:
            print(f"kiln {name}: {subcommand.pending}; nothing was run.", file=sys.stderr)
            sys.exit(NOT_BUILT_EXIT_CODE)
        try:
            code = load_handler(subcommand.handler)(cfg)
        except OSError as error:
            # a path the command cannot use (a file where a directory goes, no permission, a
            # full disk): the message names it; a traceback would add only kiln's call stack
            print(f"kiln {name}: {error}", file=sys.stderr)
            sys.exit(1)
        if code:
            sys.exit(code)

    if "--help" in args or "-h" in args:
        print_app_help(name, args)
    else:
        with composition_errors_said_by_kiln(name, args) as composed:
            app()


# Hydra's messages (with HYDRA_FULL_ERROR unset: the exception, then its causes) that kiln
# says in one line. `key=value` naming a key the schema lacks (Hydra suggests `+key=value`,
# which then fails as kiln's unknown-key error; see pretrain.config.unknown_keys):
HYDRA_UNKNOWN_KEY = re.compile(
    r"Could not override '(?P<key>[^']+)'\.\n(?:To append to your config use \+(?P<typed>.+)\n)?"
    r"Key '(?P<leaf>[^']+)' not in '(?P<schema>\w+)'"
)
# `group=option` naming no preset of the group
HYDRA_UNKNOWN_OPTION = re.compile(
    r"Could not find '(?P<group>[^']+)/(?P<option>[^'/]+)'\n\n"
    r"Available options in '[^']+':\n(?P<options>(?:\t.+\n)+)"
)
# `key=value` with a value the key's type refuses (the cause's lines between)
HYDRA_WRONG_TYPE = re.compile(
    r"Error merging override (?P<typed>.+)\n(?:.+\n)*?    full_key: (?P<full_key>\S+)\n"
    r"(?:    reference_type=.+\n)?    object_type=(?P<schema>\w+)"
)
# `map.name=value` for an entry a name -> value map does not have yet (added with `+`)
HYDRA_NEW_MAP_ENTRY = re.compile(
    r"Could not override '(?P<key>[^']+)'\.\nTo append to your config use \+(?P<typed>.+)\n"
    r"Key '(?P<leaf>[^']+)' is not in struct\n    full_key: \S+\n    reference_type=Dict\["
)


@contextlib.contextmanager
def composition_errors_said_by_kiln(name: str, args: Sequence[str]) -> Iterator[Callable[[], None]]:
    """Hold what is written to stderr while Hydra composes the config; yield the function the
    app calls once it has (stderr is then passed through, the held text first). When
    composition fails on a mistyped override (`args`: the command line), kiln's one line
    replaces Hydra's message (see `composition_error_message`); anything else Hydra said is
    passed on."""
    real, held = sys.stderr, io.StringIO()

    def composed() -> None:
        if sys.stderr is held:
            sys.stderr = real
            real.write(held.getvalue())

    sys.stderr = held
    try:
        yield composed
    finally:
        if sys.stderr is held:  # composition failed, or --cfg printed the config
            sys.stderr = real
            hydra_said = held.getvalue()
            real.write(composition_error_message(name, hydra_said, args) or hydra_said)
            real.flush()


def composition_error_message(name: str, hydra_said: str, args: Sequence[str]) -> str | None:
    """Kiln's line for the composition error in `hydra_said`, or None when it is none of a
    misspelled key, an unknown option, a value of the wrong type or a new map entry."""
    problem = (
        unknown_key_problem(hydra_said)
        or unknown_option_problem(hydra_said, args)
        or wrong_type_problem(hydra_said)
        or new_map_entry_problem(hydra_said)
    )
    return f"kiln {name}: config error: {problem}\n" if problem else None


def unknown_key_problem(hydra_said: str) -> str | None:
    """`key=value` for a key kiln's schema lacks, with the closest settings and groups."""
    match = HYDRA_UNKNOWN_KEY.search(hydra_said)
    if match is None:
        return None
    from pretrain import config

    schema = getattr(config, match["schema"], None)
    key, leaf = match["key"], match["leaf"]
    if not dataclasses.is_dataclass(schema) or not key.endswith(leaf):
        return None
    value = match["typed"].partition("=")[2] if match["typed"] else None
    hint = config.closest_settings(leaf, schema, key[: -len(leaf)], value)
    return f"{key} is not a setting of kiln{hint}"


def unknown_option_problem(hydra_said: str, args: Sequence[str]) -> str | None:
    """`group=option` on the command line naming no preset of the group, with the options and
    the closest one (a preset's own defaults list naming a missing one is Hydra's to say)."""
    match = HYDRA_UNKNOWN_OPTION.search(hydra_said)
    if match is None:
        return None
    group, option = match["group"], match["option"]
    if f"{group}={option}" not in {arg.lstrip("+") for arg in args}:
        return None
    import difflib

    options = match["options"].split()
    close = difflib.get_close_matches(option, options, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{group}={option} is not an option of {group} (options: {', '.join(options)}){hint}"


def wrong_type_problem(hydra_said: str) -> str | None:
    """`key=value` with a value the key's type refuses: what the schema says it takes."""
    match = HYDRA_WRONG_TYPE.search(hydra_said)
    if match is None:
        return None
    import typing

    from pretrain import config

    schema = getattr(config, match["schema"], None)
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    leaf = match["full_key"].rsplit(".", 1)[-1]
    if leaf not in hints:
        return None
    key, _, value = match["typed"].lstrip("+").partition("=")
    expected = describe_type(hints[leaf], key)
    problem = f"{key}={value}: {key} takes {expected}, not '{value}'"
    return problem + (f"; write {key}=[{value}]" if expected.startswith("a list") else "")


def describe_type(hint: object, key: str) -> str:
    """A schema field's type as the command line spells what it takes ("an integer", "a list")."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg, key) for arg in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if typing.get_origin(hint) is dict:
        return f"a map ({key}.NAME=VALUE)"
    if dataclasses.is_dataclass(hint):
        return f"settings ({key}.NAME=VALUE)"
    words = {bool: "true or false", int: "an integer", float: "a float", str: "a string"}
    return words.get(hint, "null" if hint is type(None) else str(hint))


def new_map_entry_problem(hydra_said: str) -> str | None:
    """`map.name=value` for an entry a map (such as data.mixture: source name -> weight) does not
    have: Hydra adds entries with `+` alone."""
    match = HYDRA_NEW_MAP_ENTRY.search(hydra_said)
    if match is None or not match["key"].endswith(f".{match['leaf']}"):
        return None
    key, leaf, typed = match["key"], match["leaf"], match["typed"]
    parent = key[: -len(leaf) - 1]
    return (
        f"{typed}: {parent} has no entry {leaf}, and a new entry of a map is added with +; "
        f"write +{typed}"
    )


def print_app_help(name: str, args: Sequence[str]) -> None:
    """`kiln NAME --help`: Hydra's help template (`hydra.help` in hydra_conf) with the config
    composed from the overrides in `args`, and the groups and options of `hydra_conf/`. Hydra's
    own listing takes 6-11 s (each of its ~150 lookups deep-copies the config store) and lists
    the `schema/*` groups too, the typed defaults the presets extend, not options a user picks.
    An override that does not compose is said as on a run (Hydra's help raises a traceback)."""
    import string

    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.config import config_groups

    overrides = get_args_parser().parse_args(args).overrides  # as Hydra reads the command line
    try:
        with initialize_config_module("hydra_conf", version_base="1.3"):
            cfg = compose(name, overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        hydra_said = f"{error}\n"  # as Hydra says it on a run
        if isinstance(error.__cause__, OmegaConfBaseException):
            hydra_said += f"{error.__cause__}\n"
        sys.stderr.write(composition_error_message(name, hydra_said, args) or hydra_said)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    HydraConfig.instance().set_config(cfg)  # for the template's ${hydra:...}
    template = string.Template(cfg.hydra.help.template)
    with open_dict(cfg):
        del cfg["hydra"]
    groups = "".join(
        f"{group}: {', '.join(options)}\n" for group, options in config_groups().items()
    )
    print(template.safe_substitute(APP_CONFIG_GROUPS=groups, CONFIG=OmegaConf.to_yaml(cfg)))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(format_help())
        return 0 if args else NOT_BUILT_EXIT_CODE
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"kiln {version('kiln')}")
        return 0
    name = args[0]
    if name not in SUBCOMMANDS:
        print(
            f"kiln: unknown subcommand '{name}'; choose from: {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return NOT_BUILT_EXIT_CODE
    if (
        name == "train"
        and "RANK" not in os.environ
        and os.environ.get("KILN_WARM_AGENT", "1") != "0"
        and not any(a.startswith("-") for a in args)
    ):
        # a run (not --help, --cfg or a -m sweep): start the agent that trains its one rank or
        # runs its torchrun now, to import torch while Hydra composes; a config error discards it
        from pretrain.train import start_agent

        start_agent()
    run_subcommand(name, args[1:])
    if name == "launch":
        from launch.launcher import finish_sweep

        return finish_sweep()
    if name == "train" and "torch" in sys.modules:
        # this process trained (one rank without the warm agent: a process that hands the
        # ranks to the agent never imports torch); its outputs are written, so it skips the
        # interpreter's teardown
        from pretrain.train import exit_now

        exit_now(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
