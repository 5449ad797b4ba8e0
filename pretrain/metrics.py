"""Metric records of a training run: `RUN_DIR/metrics.jsonl`, the console and Weights & Biases.

Only rank 0 creates a `MetricsLogger`; the trainer reduces metrics across ranks first.

Every record is one JSON object on one line of `RUN_DIR/metrics.jsonl`:

    {"step": 120, "kind": "train", "time": 1718000000.123, "loss": 3.21, "lr": 0.0003, ...}

`kind` is "train", "eval" or "event" (`event` names it: "start", "checkpoint", "stopped" ...).
The file is opened for appending and flushed after each record, so a resumed run continues the
same file and a crash loses at most the line being written. A run resumed from a checkpoint
older than its last record logs some steps again; readers keep the last train or eval record
per step (see `read_records`), while W&B ignores steps below the run's last one. Non-finite floats are written as `NaN`/`Infinity`, which
Python's `json` reads back (a NaN loss is worth seeing).

Field names the trainer uses (train): `loss`, `lr`, `grad_norm`, `tokens_per_s`,
`tokens_seen`, `mfu` (a fraction, 0-1), `step_time` and `data_wait` (seconds), `memory_gib`;
(eval): `eval_loss`, `eval_ppl`, and with more than one source in the held-out split
`eval_loss/SOURCE` for each. `kiln report` plots these names.

W&B (`logger.backend=wandb`) gets each record's numbers under `<kind>/<field>` at the record's
step. The run id is made once and kept in `RUN_DIR/wandb_run_id.txt` (and returned for the
checkpoint), so a resumed or requeued job continues the same W&B run (`resume="allow"`). The
run is offline unless `logger.mode=online` and an API key is configured (WANDB_API_KEY or a
netrc entry for the W&B host); `logger.mode=disabled` skips W&B entirely. Offline runs are
written under `RUN_DIR/wandb/`, one `offline-run-*` directory per process start; upload them
with `wandb sync`. The config sent to W&B is scrubbed of anything that looks like a secret.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import secrets
import string
import sys
import time
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pretrain.config import KilnConfig, LoggerConfig, to_dict

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id.txt"
KINDS = ("train", "eval", "event")
REDACTED = "<redacted>"
DEFAULT_WANDB_HOST = "https://api.wandb.ai"

# A key is secret when one of its words is one of these (so `max_tokens` and `tokenizer` are
# not, `hf_token` and `db_password` are), or it names a key of some service (`api_key`).
SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "credential", "credentials"})
SECRET_KEY_PATTERN = re.compile(r"(api|access|private|secret|auth)[_\-]?key", re.IGNORECASE)
# `NAME=value` inside a string (a setup line such as `export WANDB_API_KEY=...`).
SECRET_ASSIGNMENT = re.compile(
    r"\b([A-Za-z0-9_]*(?:KEY|TOKEN|PASSWORD|PASSWD|SECRET)[A-Za-z0-9_]*)=(\S+)", re.IGNORECASE
)


# --------------------------------------------------------------------------------------------
# secrets


def is_secret_key(key: str) -> bool:
    """Whether a config key looks like it holds a secret (api_key, hf_token, password ...)."""
    words = set(re.split(r"[^a-z0-9]+", key.lower()))
    return bool(words & SECRET_WORDS) or bool(SECRET_KEY_PATTERN.search(key))


def scrub_secrets(value: Any, known: tuple[str, ...] = ()) -> Any:
    """A copy of a JSON-like value with secrets replaced by `REDACTED`.

    Redacts the values of secret-looking keys (`is_secret_key`) at any depth, the value part
    of `NAME=value` assignments to secret-looking names inside strings, and any occurrence of
    the `known` secret strings (e.g. the W&B API key) wherever it appears.
    """
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret_key(str(k)) and v is not None else scrub_secrets(v, known)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(item, known) for item in value]
    if isinstance(value, str):
        for secret in known:
            if secret:
                value = value.replace(secret, REDACTED)
        return SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}", value)
    return value


def config_dict(cfg: KilnConfig) -> dict[str, Any]:
    """The resolved config as plain data, with each polymorphic section's `family`/`kind`
    (class variables, which `dataclasses.asdict` leaves out) so W&B can filter on them."""
    data = to_dict(cfg)
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if is_dataclass(section):
            for tag in ("family", "kind"):
                if hasattr(type(section), tag):
                    data[f.name][tag] = getattr(type(section), tag)
    return data


# --------------------------------------------------------------------------------------------
# W&B settings


def wandb_host() -> str:
    """The W&B server host name (WANDB_BASE_URL, else the public service)."""
    base = os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST
    return re.sub(r"^[a-z]+://", "", base).split("/")[0].split(":")[0]


def api_key_configured() -> bool:
    """Whether W&B could authenticate: WANDB_API_KEY is set, or the netrc file (NETRC or
    ~/.netrc) has a password for the W&B host. The key itself is never read out or printed."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(wandb_host())
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(logger: LoggerConfig) -> str | None:
    """The W&B mode to run in, or None when W&B is not used at all."""
    if logger.backend != "wandb" or logger.mode == "disabled":
        return None
    if logger.mode == "online" and api_key_configured():
        return "online"
    return "offline"


def new_run_id() -> str:
    """Eight lowercase letters and digits, like W&B's own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def persisted_run_id(run_dir: Path, run_id: str | None = None) -> str:
    """The run's W&B id: `run_id` (from a checkpoint) if given, else the one stored in
    `run_dir`, else a new one; stored in `run_dir` for the next start."""
    path = run_dir / RUN_ID_FILE
    if run_id is None and path.is_file():
        run_id = path.read_text().strip() or None
    run_id = run_id or new_run_id()
    if not path.is_file() or path.read_text().strip() != run_id:
        path.write_text(run_id + "\n")
    return run_id


# --------------------------------------------------------------------------------------------
# the logger


def _plain(value: Any) -> Any:
    """Numbers for JSON: 0-d tensors and numpy scalars become Python numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "ndim", 0) == 0 else value


def _ends_without_newline(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline (read without loading the file)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


def format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


# console formats of some fields, whatever their size: a rate in one notation, counts whole
FIELD_FORMATS = {"lr": "{:.3e}", "tokens_per_s": "{:,.0f}", "tokens_seen": "{:,.0f}"}
QUIET_ZERO = ("nonfinite_steps",)  # said on the console only once they are not 0


def format_record(record: Mapping[str, Any]) -> str:
    """One compact console line: `step 120 | train | loss 3.21 | lr 3.000e-04 | ...`.
    Per-layer fields (`moe/L3/load_max`, with a `/`) stay in metrics.jsonl and W&B, as do
    fields that say nothing (False, None, a zero count of non-finite steps). The eval losses
    of each source (`eval_loss/web`) end the line together: `by source: web 3.1, code 2.4`."""
    parts = [f"step {record['step']:,}", str(record["kind"])]
    by_source = [f"{key.split('/', 1)[1]} {format_value(value)}"
                 for key, value in record.items() if key.startswith("eval_loss/")]  # fmt: skip
    for key, value in record.items():
        if key in ("step", "kind", "time") or "/" in key or value is None or value is False:
            continue
        if key in QUIET_ZERO and value == 0:
            continue
        form = FIELD_FORMATS.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = form.format(value) if form and number and math.isfinite(value) else None
        parts.append(f"{key} {text or format_value(value)}")
    if by_source:
        parts.append(f"by source: {', '.join(by_source)}")
    return " | ".join(parts)


class MetricsLogger:
    """Rank 0's metrics sink: `metrics.jsonl`, a console line per record, and W&B.

    Args:
        cfg: the validated config (`logger`, `run_name` and `experiment_name` are read; the
            whole config, scrubbed, goes to W&B).
        run_dir: the run directory (created if missing).
        run_id: the W&B run id saved in a checkpoint, if resuming from one.
        console: print a line per record.
    """

    def __init__(
        self,
        cfg: KilnConfig,
        run_dir: str | Path,
        *,
        run_id: str | None = None,
        console: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.path = self.run_dir / METRICS_FILE
        cut = _ends_without_newline(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if cut:
            self._file.write("\n")  # a line cut short by a crash stays on its own line
        self.mode = resolve_mode(cfg.logger)
        self.run_id: str | None = None
        self._wandb_run: Any = None
        if self.mode is not None:
            self.run_id = persisted_run_id(self.run_dir, run_id)
            try:
                self._wandb_run = self._init_wandb()
            except BaseException:
                self._file.close()
                raise

    def _init_wandb(self) -> Any:
        import wandb

        logger = self.cfg.logger
        if logger.mode == "online" and self.mode == "offline":
            print(
                "kiln: logger.mode=online but no W&B API key is configured (WANDB_API_KEY or "
                "~/.netrc); logging offline",
                file=sys.stderr,
            )
        config = scrub_secrets(config_dict(self.cfg), (os.environ.get("WANDB_API_KEY", ""),))
        return wandb.init(
            project=logger.project,
            entity=logger.entity,
            group=logger.group or self.cfg.experiment_name,
            tags=list(logger.tags),
            name=self.cfg.run_name,
            id=self.run_id,
            resume="allow",
            config=config,
            # W&B's files go where WANDB_DIR says (a local disk, say), else in the run directory
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            mode=self.mode,
            # stdout stays untouched (Slurm logs keep it); no code or git diff is uploaded;
            # offline, W&B's own hints (`wandb online`, `wandb sync`) repeat kiln's line
            settings=wandb.Settings(
                console="off", save_code=False, disable_git=True, silent=self.mode == "offline"
            ),
        )

    @property
    def wandb_dir(self) -> Path | None:
        """This process's local W&B run directory (`RUN_DIR/wandb/offline-run-*` offline)."""
        if self._wandb_run is None:
            return None
        return Path(self._wandb_run.settings.sync_dir)

    def log(self, record: Mapping[str, Any], *, echo: bool = True) -> dict[str, Any]:
        """Write one record; returns it as written.

        Args:
            record: `step` (int, the optimizer step), `kind` ("train", "eval" or "event";
                default "train") and fields: numbers, strings, booleans or None. 0-d tensors
                and numpy scalars become Python numbers (a tensor's `.item()` syncs its
                device). `time` (Unix seconds) is added unless given.
            echo: also print it on the console (when the logger has one); False for a record
                the caller has printed in its own form.

        Returns:
            The record as written: `step`, `kind`, `time` first, then the fields in order.
        """
        if not isinstance(record.get("step"), int):
            raise ValueError(f"a record needs an int 'step', got {record.get('step')!r}")
        kind = record.get("kind", "train")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        written: dict[str, Any] = {
            "step": record["step"],
            "kind": kind,
            "time": record.get("time", round(time.time(), 3)),
        }
        written |= {str(k): _plain(v) for k, v in record.items() if k not in written}
        try:
            self._file.write(json.dumps(written) + "\n")
            self._file.flush()
        except OSError as error:  # a full disk, mostly: say which file
            raise OSError(error.errno, error.strerror, str(self.path)) from error
        if self.console and echo:
            print(format_record(written), flush=True)
        if self._wandb_run is not None:
            self._to_wandb(written)
        return written

    def _to_wandb(self, written: dict[str, Any]) -> None:
        """Numbers (and booleans) as history under `kind/name`; an event's under
        `event/EVENT/name` (a checkpoint's seconds apart from an evaluation's), and its text
        (a path, a sample) in the run's summary under the same keys. None stays in
        metrics.jsonl."""
        kind = written["kind"]
        prefix = f"event/{written.get('event')}" if kind == "event" else kind
        fields = {k: v for k, v in written.items() if k not in ("step", "kind", "time", "event")}
        numbers = {f"{prefix}/{k}": v for k, v in fields.items() if isinstance(v, (int, float))}
        if numbers:
            self._wandb_run.log(numbers, step=written["step"])
        if kind == "event":
            text = {f"{prefix}/{k}": v for k, v in fields.items() if isinstance(v, str)}
            if text:
                self._wandb_run.summary.update(text)

    def event(self, step: int, event: str, **fields: Any) -> dict[str, Any]:
        """An `event` record: `{"step": step, "kind": "event", "event": event, **fields}`."""
        return self.log({"step": step, "kind": "event", "event": event, **fields})

    def finish(self, exit_code: int = 0) -> Path | None:
        """Close the file and the W&B run. Returns the local W&B run directory (printing the
        `wandb sync` command when offline), or None without W&B. Safe to call twice."""
        if not self._file.closed:
            self._file.close()
        run, self._wandb_run = self._wandb_run, None
        if run is None:
            return None
        directory = Path(run.settings.sync_dir)
        run.finish(exit_code=exit_code)
        if self.mode == "offline":
            print(f"kiln: W&B offline run in {directory}; upload with: wandb sync {directory}")
        return directory

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a `metrics.jsonl` and the number of lines that were not records (a line
    cut by a crash).

    Train and eval records are kept once per (kind, step), the last one written (a resumed run
    logs again the steps after its checkpoint), in the file order of that last write. Every
    event is kept.
    """
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    bad = events = 0
    # undecodable bytes (a damaged line) make that line a bad one, not the whole file
    with Path(path).open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                bad += 1
                continue
            kind = str(record.get("kind"))
            events += kind == "event"
            key = (kind, events) if kind == "event" else (kind, record["step"])
            latest.pop(key, None)  # re-insert: order follows the last write
            latest[key] = record
    return list(latest.values()), bad
