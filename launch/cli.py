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
        print_app_help(app)
    else:
        with composition_errors_said_by_kiln(name) as composed:
            app()


# Hydra's message for `key=value` naming a key the schema lacks (it suggests `+key=value`,
# which then fails as kiln's unknown-key error; see pretrain.config.unknown_keys)
HYDRA_UNKNOWN_KEY = re.compile(
    r"Could not override '(?P<key>[^']+)'\.\n(?:To append to your config use \S+\n)?"
    r"Key '(?P<leaf>[^']+)' not in '(?P<schema>\w+)'"
)


@contextlib.contextmanager
def composition_errors_said_by_kiln(name: str) -> Iterator[Callable[[], None]]:
    """Hold what is written to stderr while Hydra composes the config; yield the function the
    app calls once it has (stderr is then passed through, the held text first). When
    composition fails on a misspelled key, kiln's one line, with the closest settings, replaces
    Hydra's message (which suggests `+key=value`); anything else Hydra said is passed on."""
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
            real.write(unknown_key_message(name, held.getvalue()) or held.getvalue())
            real.flush()


def unknown_key_message(name: str, hydra_said: str) -> str | None:
    """Kiln's line for Hydra's unknown-key error in `hydra_said`, or None when it is not one."""
    match = HYDRA_UNKNOWN_KEY.search(hydra_said)
    if match is None:
        return None
    import difflib

    from pretrain import config

    schema = getattr(config, match["schema"], None)
    key, leaf = match["key"], match["leaf"]
    if not dataclasses.is_dataclass(schema) or not key.endswith(leaf):
        return None
    parent = key[: -len(leaf)]
    close = difflib.get_close_matches(leaf, [f.name for f in dataclasses.fields(schema)], n=2)
    hint = f" (did you mean {' or '.join(parent + c for c in close)}?)" if close else ""
    return f"kiln {name}: config error: {key} is not a setting of kiln{hint}\n"


def print_app_help(app: Callable[[], None]) -> None:
    """Hydra's `--help` without the `schema/*` groups: those hold the typed defaults the
    presets extend (ConfigStore entries), not options a user picks, and Hydra lists every group
    it can find, with no setting to hide some."""
    import contextlib
    import io

    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            app()
    finally:
        lines = text.getvalue().splitlines(keepends=True)
        sys.stdout.write("".join(line for line in lines if not line.startswith("schema/")))


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
