"""Grids on Slurm: every cell that is not done becomes one task of a Slurm job array (plain `sbatch --array`).

    python -m mambadm.grid GRID.yaml --parallel slurm [--wait]

Submitting (`run_slurm`) writes, under OUT/slurm/:

    cells.json        each cell's arguments to `run_cell`, by cell key (rewritten on every run: the latest grid wins)
    submit-NNN.sh     the batch script of the NNN-th submission: #SBATCH lines from `resources.slurm`, the cell keys
                      by array index, and the one command a task runs, `python -m mambadm.study.slurm cells.json KEY`
    jobs.json         the Slurm job of every cell submitted so far, `<array job id>_<index>`
    logs/%A_%a.out    each task's output (appended over requeued attempts)
    failed/KEY.json   written by a cell whose stage failed (stage, exit code, log); removed when it is resubmitted

A task runs `run_cell`, so a cell's folder and `row.json` are the ones a local run writes. Cells with `row.json` are
never submitted, and cells whose job is still queued or running are followed instead of submitted again: a grid can
be submitted, left, and rerun later to collect its results or to resubmit what the scheduler killed. A killed cell
resumes from its last checkpoint (training runs with `train.resume=auto` into the same run dir):
- preemption and node failure: the job is submitted with `--requeue`, so Slurm puts it back in the queue;
- the time limit: Slurm sends the batch shell USR1 `requeue_grace_s` before it, and the shell requeues its own task
  (at most `requeues` times, counted by SLURM_RESTART_COUNT);
- `scancel`, or a time limit past the requeues: the next run of the grid submits the cell again.
With more than one node, training starts on every node through `srun` (Accelerate's multi-node launch: machine rank
= SLURM_NODEID, main process = the allocation's first node) and evaluation runs once, on the first node.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipeline.atomic import atomic_write_text
from mambadm.study.cell import REPO, CellFailed, run_cell, train_command
from mambadm.study.grid import _cell_args, write_results  # grid imports this module only when it runs
from mambadm.study.plan import Cell

ARGS = ("cell", "cell_dir", "base", "launcher", "eval", "resources")  # run_cell's arguments, as cells.json names them
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "TIMEOUT", "REVOKED"}  # squeue's final job states (a job shows one for MinJobAge seconds, then it is gone)


class SlurmError(RuntimeError):
    """A Slurm command failed (its stderr is in the message)."""


class JobEnded(CellFailed):
    """A cell's job left the queue without the cell being done: cancelled, timed out, preempted, node failure."""

    def __init__(self, cell: str, job: str, state: str, log: Path) -> None:
        RuntimeError.__init__(self, f"cell {cell}: Slurm job {job} ended ({state}) before the cell was done; "
                                    f"rerun the grid to resume it; log: {log}")
        self.cell, self.stage, self.code, self.log = cell, f"Slurm job {job}", None, log


def slurm(*cmd: str) -> str:
    """Runs a Slurm client command; its stdout, or SlurmError naming the command and its stderr."""
    if not shutil.which(cmd[0]):
        raise SlurmError(f"{cmd[0]} not found: --parallel slurm runs where the Slurm client commands are on PATH")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def queue() -> dict[str, str]:
    """The state of each of this user's jobs Slurm still knows, by `<array job id>_<index>` (or plain job id)."""
    lines = slurm("squeue", "--me", "--array", "--noheader", "--states=all", "--format=%i %T").splitlines()
    return dict(line.split()[:2] for line in lines if line.strip())


def batch_script(grid: Any, out: Path, indices: list[int], keys: list[str]) -> str:
    """The batch script of one submission: task i runs the cell keys[i]."""
    s = grid.resources.slurm
    throttle = f"%{s.max_running}" if s.max_running else ""
    options = [f"--job-name={grid.name}", f"--array={','.join(map(str, indices))}{throttle}",
               f"--output={out / 'slurm' / 'logs' / '%A_%a.out'}", "--open-mode=append", "--requeue",
               f"--nodes={s.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={s.cpus_per_node}", f"--time={s.time}"]
    options += [f"--{name}={value}" for name, value in (("partition", s.partition), ("account", s.account),
                                                        ("gpus-per-node", s.gpus_per_node), ("mem", s.mem_per_node))
                if value]
    if s.requeues:
        options.append(f"--signal=B:USR1@{s.requeue_grace_s}")
    q = shlex.quote
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in [*options, *s.sbatch_args]),
             "# Written by `python -m mambadm.grid` (--parallel slurm): task i runs the grid cell cells[i] with the",
             "# cell's own commands (training, then evaluation); see mambadm/study/slurm.py.",
             f"cells=({' '.join(map(q, keys))})", f"cd {q(str(REPO))}", *s.setup,
             "task=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}",
             f"requeue() {{  # USR1 comes {s.requeue_grace_s} s before the time limit",
             f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {s.requeues} ]; then',
             '    echo "mambadm: time limit near: requeueing $task"; scontrol requeue "$task"',
             "  fi",
             "}",
             "trap requeue USR1",
             f'{q(sys.executable)} -m mambadm.study.slurm {q(str(out / "slurm" / "cells.json"))} '
             '"${cells[$SLURM_ARRAY_TASK_ID]}" &',
             "cell=$!",
             'while true; do wait "$cell"; code=$?; kill -0 "$cell" 2>/dev/null || break; done  # a trap ends wait',
             'exit "$code"']
    return "\n".join(lines) + "\n"


def submit(grid: Any, out: Path, cells: list[Cell], todo: list[int]) -> str:
    """Submits cells[i] for i in `todo` as one job array; returns the array's job id (task i is `<id>_<i>`)."""
    folder = out / "slurm"
    n = len(list(folder.glob("submit-*.sh"))) + 1
    script = folder / f"submit-{n:03d}.sh"
    atomic_write_text(script, batch_script(grid, out, todo, [c.key for c in cells]))
    for i in todo:
        (folder / "failed" / f"{cells[i].key}.json").unlink(missing_ok=True)
    return slurm("sbatch", "--parsable", str(script)).strip().split(";")[0]  # `id` or `id;cluster`


def run_slurm(grid: Any, grid_file: Path, out: Path, cells: list[Cell], wait: bool = False) -> list[CellFailed]:
    """Submits the cells that are neither done nor queued; with `wait`, follows every queued cell to its end and
    returns the cells that ended without being done."""
    folder = out / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "failed").mkdir(exist_ok=True)
    specs = {c.key: dict(zip(ARGS, _cell_args(grid, grid_file, out, c))) for c in cells}
    atomic_write_text(folder / "cells.json", json.dumps(specs, indent=1, default=str) + "\n")
    jobs_file = folder / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}
    try:
        states = queue()
        queued = [c.key for c in cells if states.get(jobs.get(c.key, ""), "COMPLETED") not in ENDED]
        todo = [i for i, c in enumerate(cells) if not done(out, c) and c.key not in queued]
        if todo:
            array = submit(grid, out, cells, todo)
            jobs |= {cells[i].key: f"{array}_{i}" for i in todo}
            atomic_write_text(jobs_file, json.dumps(jobs, indent=1) + "\n")
    except SlurmError as e:
        raise SystemExit(f"grid: {e}") from None
    print(f"grid: {sum(done(out, c) for c in cells)}/{len(cells)} cells done, {len(todo)} submitted"
          + (f" as job array {array}" if todo else "") + f", {len(queued)} still queued or running from before")
    followed = {k: jobs[k] for k in queued + [cells[i].key for i in todo]}
    if not wait:
        if followed:
            print("grid: `squeue --me` shows them; rerun the grid to collect the results (or add --wait)")
        return []
    try:
        return follow(grid, out, cells, followed)
    except KeyboardInterrupt:
        print("\ngrid: stopped following; the jobs go on (rerun the grid to follow them again)", file=sys.stderr)
        return []


def done(out: Path, cell: Cell) -> bool:
    return (out / "cells" / cell.key / "row.json").is_file()


def follow(grid: Any, out: Path, cells: list[Cell], jobs: dict[str, str]) -> list[CellFailed]:
    """Polls the queue until none of `jobs` ({cell key: job}) is queued or running, rewriting results.csv as cells
    finish; returns the cells that ended without row.json (a failed stage, or the job's last state)."""
    last: dict[str, str] = {}
    finished = sum(done(out, c) for c in cells)
    with tqdm(total=len(cells), initial=finished, desc="grid (slurm)", unit="cell") as bar:
        while True:
            try:
                states = queue()
            except SlurmError as e:  # a busy controller times out now and then: look again later
                tqdm.write(f"grid: {e}")
                time.sleep(grid.resources.slurm.poll_s)
                continue
            last |= {k: states[job] for k, job in jobs.items() if job in states}
            now = sum(done(out, c) for c in cells)
            if now != finished:
                write_results(out, cells)
                bar.update(now - finished)
                finished = now
            running = [k for k, job in jobs.items() if states.get(job, "COMPLETED") not in ENDED]
            bar.set_postfix_str(f"{len(running)} queued or running")
            if not running:
                break
            time.sleep(grid.resources.slurm.poll_s)
    failures: list[CellFailed] = []
    for key, job in jobs.items():
        if (out / "cells" / key / "row.json").is_file():
            continue
        record = out / "slurm" / "failed" / f"{key}.json"
        if record.is_file():
            f = json.loads(record.read_text())
            failures.append(CellFailed(key, f["stage"], f["code"], Path(f["log"])))
        else:
            failures.append(JobEnded(key, job, last.get(key, "gone from the queue"),
                                     out / "slurm" / "logs" / f"{job}.out"))
    return failures


def node_train_command(spec: dict[str, Any], head: str, env: dict[str, str]) -> list[str]:
    """The cell's `accelerate launch` on one node of a multi-node job (`head`: the address of the node running the
    batch script, the allocation's first): the local command with Accelerate's multi-node flags before
    `-m mambadm.train` (on the command line they win over `--num_machines 1` and over a config file's values)."""
    resources = spec["resources"]
    cmd = train_command(spec["launcher"], Path(spec["base"]), spec["cell"]["overrides"],
                        int(resources["num_processes"]), resources["accelerate_config"] or None)
    at = cmd.index("mambadm.train") - 1
    machine = ["--num_machines", env["SLURM_JOB_NUM_NODES"], "--machine_rank", env["SLURM_NODEID"],
               "--main_process_ip", head, "--main_process_port", str(20000 + int(env["SLURM_JOB_ID"]) % 20000)]
    return cmd[:at] + machine + cmd[at:]


def node_address(name: str) -> str:
    """The address Slurm reaches node `name` at (its NodeAddr, which is the name itself unless set apart)."""
    fields = (f.split("=", 1) for f in slurm("scontrol", "--oneliner", "show", "node", name).split() if "=" in f)
    return dict(fields).get("NodeAddr", name)


def run_task(cells_json: Path, key: str) -> int:
    """One array task: the cell `key` of cells.json, as `run_cell` runs it locally. Exit 0 when done, 1 when a stage
    failed (recorded in failed/KEY.json)."""
    spec = json.loads(cells_json.read_text())[key]
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    job = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    print(f"mambadm: cell {key}, job {job}, attempt {int(os.environ.get('SLURM_RESTART_COUNT', 0)) + 1}, "
          f"{nodes} node(s)", flush=True)
    train_cmd = None
    if nodes > 1:  # every node runs the per-node launch below; evaluation then runs here only
        cpus = spec["resources"]["slurm"]["cpus_per_node"]
        head = node_address(os.environ["SLURMD_NODENAME"])  # this node, the allocation's first
        train_cmd = ["srun", "--ntasks-per-node=1", f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1", sys.executable,
                     "-m", "mambadm.study.slurm", str(cells_json), key, "--node", head]
    try:
        run_cell(spec["cell"], Path(spec["cell_dir"]), Path(spec["base"]), spec["launcher"], spec["eval"],
                 spec["resources"], train_cmd=train_cmd)
    except CellFailed as e:
        print(f"mambadm: {e}", flush=True)
        atomic_write_text(cells_json.parent / "failed" / f"{key}.json",
                          json.dumps({"stage": e.stage, "code": e.code, "log": str(e.log)}) + "\n")
        return 1
    print(f"mambadm: cell {key} done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One grid cell inside a Slurm job (the batch script runs this).")
    parser.add_argument("cells", type=Path, help="OUT/slurm/cells.json")
    parser.add_argument("key", help="the cell's key")
    parser.add_argument("--node", metavar="HEAD",
                        help="multi-node jobs: start this node's part of the training, with HEAD as the main process "
                             "(srun runs this on every node)")
    args = parser.parse_args(argv)
    if args.node:
        cmd = node_train_command(json.loads(args.cells.read_text())[args.key], args.node, dict(os.environ))
        print(f"mambadm: node {os.environ.get('SLURMD_NODENAME')}: machine rank {os.environ['SLURM_NODEID']} of "
              f"{os.environ['SLURM_JOB_NUM_NODES']}, main process {args.node}", flush=True)
        os.chdir(REPO)
        os.execv(cmd[0], cmd)
    return run_task(args.cells, args.key)


if __name__ == "__main__":
    sys.exit(main())
