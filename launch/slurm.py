"""`kiln launch cluster=slurm`: render an sbatch script from the typed cluster config and
`launch/templates/job.sbatch.tmpl` (package data: it ships in the wheel), submit it, and report
the job.

The job runs the launch directory's `config.pkl`:

- `cluster.launch_mode=torchrun` (default): one task per node, each a torchrun agent with
  `cluster.gpus_per_node` ranks and a c10d rendezvous on the allocation's first node;
- `cluster.launch_mode=srun`: one task per rank; each maps Slurm's variables to torch's
  (`launch/slurm_task.py`).

Time limits and preemption: `--signal=B:USR1@cluster.signal_seconds` warns the batch shell,
which passes SIGTERM to the job step; the trainer checkpoints and exits with the requeue
status (42), and the script requeues the job (same run directory, same W&B run id) unless
the slice made no new checkpoint (forward-progress guard) or `cluster.max_requeues` is used
up. With `trainer.checkpoint_minutes=0`, a Slurm launch checkpoints every quarter of the
time limit as well.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launch.launcher import in_multirun, write_command, write_config

TEMPLATE = Path(__file__).resolve().parent / "templates" / "job.sbatch.tmpl"
SCRIPT_NAME = "job.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# characters an #SBATCH line cannot carry literally (sbatch reads one line, with "..." quoting)
_SBATCH_UNSAFE = re.compile(r'[\x00-\x1f\x7f"]')


class SlurmLaunchError(ValueError):
    """A cluster setting that cannot go into an sbatch script; the message names the key."""


# --------------------------------------------------------------------------------------------
# host lists and ranks (pure functions)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (`gpu[01-03,07],login1`, `r[1-2]-n[1-2]`) expanded as
    `scontrol show hostnames` does: in order, zero padding kept, bracket groups multiplied
    out left to right."""
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        names.extend(_expand_item(item))
    return names


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    items.append("".join(current))
    return [item for item in items if item]


def _expand_item(item: str) -> list[str]:
    start = item.find("[")
    if start < 0:
        return [item]
    end = item.index("]", start)
    prefix, body, rest = item[:start], item[start + 1 : end], item[end + 1 :]
    values = []
    for part in body.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            width = len(low)
            values += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
        else:
            values.append(part)
    return [prefix + value + tail for value in values for tail in _expand_item(rest)]


def rank_layout(nodes: int, per_node: int) -> list[dict[str, int]]:
    """Every rank of `nodes` x `per_node`, as torchrun (per node) and srun (block
    distribution) both number them: rank = node * per_node + local rank."""
    return [
        {
            "rank": node * per_node + local,
            "node_rank": node,
            "local_rank": local,
            "world_size": nodes * per_node,
            "local_world_size": per_node,
        }  # fmt: skip
        for node in range(nodes)
        for local in range(per_node)
    ]


def torch_env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables for one srun task (one task per rank)."""
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    tasks = int(env["SLURM_NTASKS"])
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or str(tasks // len(nodes))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": per_node,
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": env.get("KILN_HEAD_ADDR") or nodes[0],
        "MASTER_PORT": env.get("KILN_RDZV_PORT", "29500"),
    }


# --------------------------------------------------------------------------------------------
# the script


def time_limit_minutes(limit: str) -> float:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, clock = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    parts = [int(p) for p in clock.split(":")]
    if "-" in limit:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def _sbatch_value(key: str, value: object) -> str:
    text = str(value)
    if _SBATCH_UNSAFE.search(text):
        raise SlurmLaunchError(
            f"{key}={text!r} cannot go into an #SBATCH line (it holds a newline, a double "
            "quote or a control character)"
        )
    return f'"{text}"' if re.search(r"\s|#", text) else text


def job_name(cfg: Any) -> str:
    """The run name with anything but letters, digits, '.', '_' and '-' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"kiln-{cfg.job}-{cfg.run_name}")[:128]


def sbatch_lines(cfg: Any, log_path: Path) -> list[str]:
    cluster = cfg.cluster
    torchrun = cluster.launch_mode == "torchrun" and cfg.job == "train"
    per_node = 1 if torchrun or cfg.job == "data" else cluster.gpus_per_node
    options: list[tuple[str, object | None]] = [
        ("job-name", job_name(cfg)),
        ("nodes", cluster.nodes),
        ("ntasks-per-node", per_node),
        # cluster.cpus_per_task is per rank: a torchrun task runs a node's ranks
        ("cpus-per-task", cluster.cpus_per_task * (cluster.gpus_per_node if torchrun else 1)),
        ("gpus-per-node", cluster.gpus_per_node if cluster.accelerator == "cuda" else None),
        ("time", cluster.time_limit),
        ("partition", cluster.partition),
        ("account", cluster.account),
        ("qos", cluster.qos),
        ("mem", cluster.mem),
        ("constraint", cluster.constraint),
        ("signal", f"B:USR1@{cluster.signal_seconds}" if cfg.job == "train" else None),
        ("requeue", True if cfg.job == "train" else None),
        ("open-mode", "append"),  # a requeued slice appends to the same log
    ]
    keys = {"job-name": "run_name", "time": "cluster.time_limit", "mem": "cluster.mem"}
    lines = []
    for option, value in options:
        if value is None:
            continue
        if value is True:
            lines.append(f"#SBATCH --{option}")
            continue
        key = keys.get(option, f"cluster.{option.replace('-', '_')}")
        lines.append(f"#SBATCH --{option}={_sbatch_value(key, value)}")
    if not _SBATCH_UNSAFE.search(str(log_path)):
        lines.append(f"#SBATCH --output={_sbatch_value('log', log_path)}")
    for index, extra in enumerate(cluster.extra_sbatch):
        text = extra.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH") :].strip()
        if "\n" in text or "\r" in text:
            raise SlurmLaunchError(f"cluster.extra_sbatch[{index}]={extra!r} holds a newline")
        lines.append(f"#SBATCH {text}")
    return lines


def task_command(cfg: Any) -> tuple[str, str]:
    """(srun options, the command each task runs), for the script."""
    cluster = cfg.cluster
    container = ""
    if cluster.container_image:  # pyxis/enroot's srun options
        container = (
            f" --container-image={shlex.quote(cluster.container_image)}"
            ' --container-workdir="$PWD" --container-mounts="$PWD"'
        )
    if cfg.job == "data":
        return (f"--ntasks=1 --kill-on-bad-exit=1{container}",
                '"$KILN_PYTHON" -m launch.slurm_task data "$KILN_CONFIG"')  # fmt: skip
    if cluster.launch_mode == "srun":
        return (
            f"--ntasks-per-node={cluster.gpus_per_node} --kill-on-bad-exit=1{container}",
            '"$KILN_PYTHON" -m launch.slurm_task train "$KILN_CONFIG"',
        )
    # kiln's torchrun: torchrun itself, without the traceback of its own stack when a rank
    # fails or it is signalled (a scancel, a preemption), which buried the ranks' own lines
    command = (
        '"$KILN_PYTHON" -m pretrain.torchrun --nnodes="$SLURM_JOB_NUM_NODES" '
        f"--nproc_per_node={cluster.gpus_per_node} --rdzv_backend=c10d "
        '--rdzv_endpoint="$KILN_HEAD_ADDR:$KILN_RDZV_PORT" --rdzv_id="$SLURM_JOB_ID" '
        '--max_restarts=0 -m pretrain.train "$KILN_CONFIG"'
    )
    return f"--ntasks-per-node=1 --kill-on-bad-exit=1{container}", command


# launch.rdzv_port=0: the port from the job id, in 20000-29999 (below Linux's ephemeral ports,
# 32768 up): two jobs on one node (a sweep, single-GPU jobs packed on a node) would otherwise
# both use one port, and the second job's agents would join the first job's store
RDZV_PORT_BASE, RDZV_PORT_SPAN = 20000, 10000


def rdzv_port(cfg: Any) -> str:
    """The script's KILN_RDZV_PORT value: launch.rdzv_port, or shell arithmetic on the job id."""
    port = int(cfg.launch.rdzv_port)
    return str(port) if port else f'"$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))"'


def render_script(cfg: Any, directory: Path, config_path: Path, log_path: Path) -> str:
    """The sbatch script's text."""
    cluster = cfg.cluster
    srun_options, command = task_command(cfg)
    env = []
    if cluster.accelerator == "cpu":
        env = ["export DS_ACCELERATOR=cpu", "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]
    if cfg.job == "train":
        # a signalled torchrun gives its ranks this long to finish the step and save before it
        # kills them (torch >= 2.12 reads it; 30 s before): the warning's lead time
        env.append("export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="
                   f"${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{int(cluster.signal_seconds)}}}")  # fmt: skip
    values = {
        "sbatch_lines": "\n".join(sbatch_lines(cfg, log_path)),
        "run_dir": shlex.quote(str(directory.resolve())),
        "config": shlex.quote(str(config_path.resolve())),
        "python": shlex.quote(cluster.python or sys.executable),
        "max_requeues": str(int(cluster.max_requeues)),
        "requeue_status": str(_requeue_status()),
        "job": shlex.quote(cfg.job),
        "workdir": shlex.quote(str(Path.cwd())),
        "env_lines": "\n".join(env),
        "setup_lines": "\n".join(cluster.setup),
        "rdzv_port": rdzv_port(cfg),
        "srun_options": srun_options,
        "task_command": command,
    }
    template = TEMPLATE.read_text()
    missing = set(_PLACEHOLDER.findall(template)) - set(values)
    if missing:  # pragma: no cover - the template and this function change together
        raise KeyError(f"{TEMPLATE}: no value for {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _requeue_status() -> int:
    from pretrain.exit_codes import REQUEUE_EXIT_CODE

    return REQUEUE_EXIT_CODE


# --------------------------------------------------------------------------------------------
# submit and report


def job_state(job_id: str) -> str:
    """The job's state from squeue, or from sacct / scontrol once it left the queue."""
    for command in (
        ["squeue", "--noheader", "--jobs", job_id, "--format=%T"],
        ["sacct", "--noheader", "--parsable2", "--jobs", job_id, "--format=State", "-X"],
        ["scontrol", "show", "job", job_id],
    ):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode != 0:
            continue
        if command[0] == "scontrol":
            match = re.search(r"JobState=(\S+)", result.stdout)
            if match:
                return match.group(1)
            continue
        state = result.stdout.strip().split("\n")[0].split(" ")[0]
        if state:
            return state
    return "UNKNOWN"


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip
# why a job is pending (squeue's %r) when it cannot start until the cluster's settings change:
# more than the partition has or allows, a bad account or QOS
NEVER_STARTS = {
    "PartitionConfig": "it asks for more than the partition has (nodes, CPUs, GPUs, memory)",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows a job",
    "PartitionTimeLimit": "its time limit is above the partition's",
    "BadConstraints": "no node has the features and resources it asks for",
    "InvalidAccount": "its account (cluster.account) is not valid here",
    "InvalidQOS": "its QOS (cluster.qos) is not valid here",
    "QOSMaxNodePerJobLimit": "it asks for more nodes than its QOS allows a job",
    "QOSMaxWallDurationPerJobLimit": "its time limit is above its QOS's",
}


def pending_reason(job_id: str) -> str | None:
    """Why the job waits (squeue's reason), or None when it is not pending."""
    try:
        result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T %r"],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    state, _, reason = result.stdout.strip().partition(" ")
    reason = reason.strip()
    if result.returncode != 0 or state != "PENDING" or reason in ("", "None"):
        return None  # "None": the scheduler has not looked at it yet
    return reason


def queued_job(directory: Path) -> tuple[str, str] | None:
    """(job id, state) of the Slurm job last submitted for `directory` while it is still queued
    or running (it reads the directory's config.pkl when it starts, and at each requeue)."""
    try:
        job_id = (directory / "slurm" / "job_id").read_text().strip()
    except OSError:
        return None
    if not job_id.isdigit():
        return None
    try:
        result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = result.stdout.strip().split("\n")[0].strip()
    if result.returncode != 0 or not state or state in TERMINAL:
        return None
    return job_id, state


def submit_problems(cfg: Any, directory: Path) -> list[str]:
    """What would make the job fail, or never start, found before anything is written or
    submitted: a bad time limit, a warning that leaves no time to train, no sbatch here, a job
    of this run directory still queued or running, and kiln train's own preflight (the run
    directory, shards and checkpoint are on a file system the nodes share)."""
    cluster = cfg.cluster
    try:
        limit = time_limit_minutes(cluster.time_limit) * 60
    except ValueError:
        return [f"cluster.time_limit={cluster.time_limit!r} is not a Slurm time (M, M:S, H:M:S, "
                "D-H, D-H:M or D-H:M:S)"]  # fmt: skip
    problems = []
    if cfg.job == "train" and cluster.signal_seconds * 2 > limit:
        problems.append(
            f"cluster.signal_seconds={cluster.signal_seconds} is more than half of "
            f"cluster.time_limit={cluster.time_limit} ({limit:.0f} s): every slice would be told "
            "to checkpoint and requeue soon after it starts; lower cluster.signal_seconds or "
            "raise cluster.time_limit"
        )
    if not cluster.dry_run and shutil.which("sbatch") is None:
        problems.append("sbatch is not on PATH (not a Slurm submit host? `module load slurm`?); "
                        "cluster.dry_run=true writes the script without submitting")  # fmt: skip
    queued = None if cluster.dry_run else queued_job(directory)
    if queued is not None:
        job_id, state = queued
        problems.append(
            f"Slurm job {job_id} of {directory} is still {state} (slurm/job_id), and would run "
            f"this launch's config: wait for it, `scancel {job_id}`, or launch into another "
            f"{'trainer.run_dir' if cfg.job == 'train' else 'output_dir'}"
        )
    if cfg.job == "train" and not problems:
        from pretrain.preflight import preflight

        problems += preflight(cfg, on_this_machine=False)
    return problems


def launch(cfg: Any, directory: Path) -> int:
    cluster = cfg.cluster
    if cfg.job == "data" and cluster.nodes != 1:
        print("kiln launch cluster=slurm job=data: one node (cluster.nodes=1); for the data "
              "pipeline on many nodes use cluster=ray", file=sys.stderr)  # fmt: skip
        return 1
    if cluster.launch_mode not in ("torchrun", "srun"):
        print(f"kiln launch: cluster.launch_mode={cluster.launch_mode!r} is not 'torchrun' or "
              "'srun'", file=sys.stderr)  # fmt: skip
        return 1
    problems = submit_problems(cfg, directory)
    for problem in problems:
        print(f"kiln launch: {problem}", file=sys.stderr)
    if problems:
        return 1
    if cfg.job == "train" and cfg.trainer.checkpoint_minutes == 0:
        cfg.trainer.checkpoint_minutes = max(1.0, time_limit_minutes(cluster.time_limit) / 4)
    if cfg.job == "data" and cfg.ray.num_cpus is None:
        # the job's Ray takes the allocation's CPUs, not every core of a shared node
        cfg.ray.num_cpus = cluster.cpus_per_task
    slurm_dir = directory / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    log_path = (slurm_dir / "%x-%j.out").resolve()
    config_path = write_config(cfg, directory)
    try:
        script = render_script(cfg, directory, config_path, log_path)
    except SlurmLaunchError as error:
        print(f"kiln launch: {error}", file=sys.stderr)
        return 1
    script_path = slurm_dir / SCRIPT_NAME
    script_path.write_text(script)
    command = ["sbatch", "--parsable", f"--output={log_path}", str(script_path.resolve())]
    write_command(directory, command, note="submits the script; see slurm/job.sbatch")
    if cluster.dry_run:
        print(f"kiln launch: dry run, not submitted: {script_path}")
        print(f"kiln launch: submit with: {shlex.join(command[:1] + command[2:])}")
        return 0
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except OSError as error:
        print(f"kiln launch: cannot run sbatch: {error}", file=sys.stderr)
        return 1
    if result.returncode != 0:
        print(f"kiln launch: sbatch failed ({result.returncode}): {result.stderr.strip()}",
              file=sys.stderr)  # fmt: skip
        return 1
    job_id = result.stdout.strip().split(";")[0]
    (slurm_dir / "job_id").write_text(job_id + "\n")
    log = str(log_path).replace("%x", job_name(cfg)).replace("%j", job_id)
    print(f"kiln launch: submitted Slurm job {job_id}")
    print(f"kiln launch: script {script_path}")
    print(f"kiln launch: log {log}")
    state, reason = job_state(job_id), pending_reason(job_id)
    print(f"kiln launch: state {state}{f' ({reason})' if reason else ''} (squeue --jobs "
          f"{job_id}; sacct --jobs {job_id}; scancel {job_id})")  # fmt: skip
    if reason in NEVER_STARTS:
        print(f"kiln launch: job {job_id} will not start: {NEVER_STARTS[reason]} ({reason}); "
              f"scancel {job_id} and launch with a request the cluster allows", file=sys.stderr)  # fmt: skip
    if not cfg.launch.wait:
        return 0
    if in_multirun():
        # a sweep's points are submitted one after another; waiting for each before the next
        # is submitted would run the sweep one job at a time: `kiln launch` waits for them all
        # after the last point (launch.launcher.finish_sweep)
        SWEEP_JOBS.append(job_id)
        return 0
    return wait_for_jobs([job_id])


# The Slurm jobs of this process's sweep points (`kiln launch -m ... launch.wait=true`).
SWEEP_JOBS: list[str] = []


def wait_for_jobs(job_ids: list[str]) -> int:
    """Poll until every job has ended, saying so as each does: 0 if all completed, else 1.
    Polled every 0.5 s at first, backing off to every 10 s: a short job's end is seen at
    once, a long one does not query the controller more than that."""
    pending, failed, delay = list(job_ids), 0, 0.5
    reasons: dict[str, str | None] = {}
    while pending:
        for job_id in list(pending):
            state = job_state(job_id)
            if state.split()[0] in TERMINAL:
                print(f"kiln launch: job {job_id} ended: {state}", flush=True)
                pending.remove(job_id)
                failed += state != "COMPLETED"
                continue
            reason = pending_reason(job_id)
            if reason != reasons.get(job_id) and reason is not None:
                print(f"kiln launch: job {job_id} pending ({reason})", flush=True)
            reasons[job_id] = reason
            if reason in NEVER_STARTS:
                print(f"kiln launch: job {job_id} will not start: {NEVER_STARTS[reason]} "
                      f"({reason}); it stays queued: scancel {job_id}, and launch with a "
                      "request the cluster allows", file=sys.stderr, flush=True)  # fmt: skip
                pending.remove(job_id)
                failed += 1
        if pending:
            time.sleep(delay)
            delay = min(10.0, delay * 1.5)
    return 1 if failed else 0
