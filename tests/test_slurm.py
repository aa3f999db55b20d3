"""Grids on Slurm (`--parallel slurm`): the batch script and the multi-node launch, then (slow) a real two-node Slurm
on 127.0.0.1 (tests/slurm_cluster.py) running tiny CPU grids: one cell cancelled with `scancel` and resubmitted by
the next grid run, one requeued by its own time-limit trap, both resuming from their last checkpoint, a grid run
after the end submitting nothing; a cell training across both nodes; a failed stage reported with its log."""
import csv
import json
import subprocess
import sys
import time

import pytest
from accelerate.commands.launch import launch_command_parser

from grid_setup import REPO, make_workspace, write_grid
from mambadm.config import ConfigError
from mambadm.study.plan import load_grid
from mambadm.study.slurm import batch_script, node_train_command
from slurm_cluster import slurm_cluster, unavailable

SLURM = ("{cpus_per_cell: 1, slurm: {cpus_per_node: 1, time: '10:00', max_running: 2, requeues: 1, "
         "requeue_grace_s: 60, poll_s: 1}}")


def test_batch_script_carries_the_slurm_section(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", resources=(
        "{num_processes: 8, slurm: {partition: gpu, account: lab, time: '2:00:00', nodes: 2, gpus_per_node: 4, "
        "cpus_per_node: 32, mem_per_node: 200G, max_running: 3, requeues: 2, requeue_grace_s: 240, "
        "sbatch_args: ['--qos=high'], setup: ['module load cuda']}}")))
    script = batch_script(grid, tmp_path / "out", [1, 4], ["a", "b", "c", "d", "e"])
    options = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert options >= {"--array=1,4%3", "--partition=gpu", "--account=lab", "--time=2:00:00", "--nodes=2",
                       "--gpus-per-node=4", "--cpus-per-task=32", "--mem=200G", "--signal=B:USR1@240", "--requeue",
                       "--qos=high", f"--output={tmp_path / 'out' / 'slurm' / 'logs' / '%A_%a.out'}"}
    assert "cells=(a b c d e)" in script and "module load cuda" in script and '-lt 2 ]' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_multi_node_launch_flags_win_in_accelerates_own_parser(tmp_path):
    spec = {"launcher": "accelerate", "base": "base.yaml", "cell": {"overrides": ["train.steps=5"]},
            "resources": {"num_processes": 8, "accelerate_config": ""}}
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "12345"}
    cmd = node_train_command(spec, "gpu07", env)
    at = cmd.index("accelerate.commands.launch") + 1
    args = launch_command_parser().parse_args(cmd[at:])
    assert (args.num_machines, args.machine_rank, args.main_process_ip, args.num_processes) == (2, 1, "gpu07", 8)
    assert args.multi_gpu and args.main_process_port == 20000 + 12345 % 20000
    assert args.training_script == "mambadm.train" and args.training_script_args == ["base.yaml", "train.steps=5"]


@pytest.mark.parametrize("resources, message", [
    ("{slurm: {nodes: 0}}", "resources.slurm.nodes must be >= 1, got 0"),
    ("{num_processes: 2, slurm: {gpus_per_node: 4}}", "must be resources.slurm.nodes × gpus_per_node = 4"),
    ("{num_processes: 3, slurm: {nodes: 2}}", "multiple of resources.slurm.nodes=2, got 3"),
])
def test_bad_slurm_section_is_named(tmp_path, resources, message):
    with pytest.raises(ConfigError, match=message):
        load_grid(write_grid(tmp_path / "bad.yaml", resources=resources))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("slurm_grid"))


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(nodes=2, cpus=2) as c:  # 4 CPUs, more than the cores: a resubmitted cell need not wait
        yield c


def wait_until(ready, what, timeout=120):
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def trained_to(cell):
    """Steps of the cell's complete checkpoints."""
    root = cell / "run" / "checkpoints"
    return [int(p.name[5:]) for p in root.glob("step-*") if (p / "trainer_state.json").is_file()] if root.is_dir() \
        else []


@pytest.mark.slow
def test_grid_on_slurm_resumes_cells_the_scheduler_killed(ws, tmp_path, cluster):
    grid = write_grid(ws / "slurm.yaml", families="[mambadm]", sizes="[t1]", transitions="[1500]", seeds="[0, 1, 2]",
                      steps="200", overrides="[train.ckpt_every=20, train.val_every=100]", resources=SLURM)
    out = tmp_path / "out"
    env = cluster.env | {"MAMBADM_CONFIGS": str(ws / "configs"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def grid_run(*extra):
        done = subprocess.run([sys.executable, "-m", "mambadm.grid", str(grid), "--out", str(out), "--parallel",
                               "slurm", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:] + cluster.logs()
        return done.stdout

    assert "3 submitted" in grid_run()  # returns at once
    first = json.loads((out / "slurm" / "jobs.json").read_text())
    cancelled, requeued, untouched = (out / "cells" / f"mambadm-t1-t1500-s{s}" for s in range(3))
    assert {"--array=0,1,2%2", "--cpus-per-task=1", "--requeue", "--signal=B:USR1@60"} <= set(
        (out / "slurm" / "submit-001.sh").read_text().split())

    # scancel while training, after a checkpoint: the job ends CANCELLED, the cell is not done
    wait_until(lambda: trained_to(cancelled), "a checkpoint of the first cell")
    cluster.run("scancel", first[cancelled.name])
    assert not (cancelled / "train.done").exists(), "training ended before the cancel: make the cells longer"
    # USR1 to the batch shell, as Slurm sends it `requeue_grace_s` before the time limit: the task requeues itself
    wait_until(lambda: trained_to(requeued), "a checkpoint of the second cell")
    cluster.run("scancel", "--signal=USR1", "--batch", first[requeued.name])
    assert not (requeued / "train.done").exists(), "training ended before the signal: make the cells longer"
    wait_until(lambda: cluster.jobs().get(first[cancelled.name]) == "CANCELLED", "the cancelled state", 30)

    # the next run resubmits the cancelled cell only and follows the others to the end
    followed = grid_run("--wait")
    assert "1 submitted" in followed and "2 still queued or running from before" in followed
    second = json.loads((out / "slurm" / "jobs.json").read_text())
    assert second[cancelled.name] != first[cancelled.name]
    assert second[requeued.name] == first[requeued.name] and second[untouched.name] == first[untouched.name]
    for cell, attempts in ((cancelled, 2), (requeued, 2), (untouched, 1)):
        log = (cell / "train.log").read_text()
        assert log.count("\n$ ") == attempts and "accelerate.commands.launch" in log  # the local cell's command
        assert ("resumed from" in log) == (attempts == 2), cell.name
        assert json.loads((cell / "row.json").read_text())["steps"] == 200
        last = json.loads((cell / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 200
    task_log = (out / "slurm" / "logs" / f"{first[requeued.name]}.out").read_text()
    assert "time limit near: requeueing" in task_log and "attempt 2" in task_log
    with (out / "results.csv").open() as f:
        assert sorted(r["cell"] for r in csv.DictReader(f)) == sorted(c.name for c in (cancelled, requeued, untouched))

    # a run after the end submits nothing and repeats no finished cell
    stamps = {c: (c / "row.json").stat().st_mtime_ns for c in (cancelled, requeued, untouched)}
    again = grid_run("--wait")
    assert "3/3 cells done, 0 submitted" in again
    assert {c: (c / "row.json").stat().st_mtime_ns for c in stamps} == stamps
    assert len(list((out / "slurm").glob("submit-*.sh"))) == 2


@pytest.mark.slow
def test_two_node_cell_trains_across_both_nodes(ws, tmp_path, cluster):
    ddp = REPO / "configs" / "accelerate" / "cpu-ddp.yaml"  # 2 CPU ranks over gloo: one per node here
    grid = write_grid(ws / "two_nodes.yaml", families="[mambadm]", sizes="[t1]", transitions="[1500]", steps="10",
                      overrides="[train.ckpt_every=10, train.val_every=10, data.val_shards=2]",
                      eval="{episodes: 1, actors: 1, args: ['--targets', '3600', '--no-progress']}",
                      resources=f"{{num_processes: 2, accelerate_config: {ddp}, slurm: {{nodes: 2, cpus_per_node: 1, "
                                "time: '10:00', poll_s: 1}}")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mambadm.grid", str(grid), "--out", str(out), "--parallel", "slurm",
                           "--wait"], cwd=REPO, env=cluster.env | {"MAMBADM_CONFIGS": str(ws / "configs"),
                                                                   "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=400)
    cell = out / "cells" / "mambadm-t1-t1500-s0"
    log = (cell / "train.log").read_text() if (cell / "train.log").is_file() else ""
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + log[-3000:]
    assert "\n$ srun --ntasks-per-node=1 --cpus-per-task=1" in log and "--node 127.0.0.1" in log
    assert "node n1: machine rank 0 of 2, main process 127.0.0.1" in log
    assert "node n2: machine rank 1 of 2, main process 127.0.0.1" in log
    assert "2 process(es), DistributedType.MULTI_CPU" in log  # one data-parallel run over both nodes
    assert json.loads((cell / "row.json").read_text())["steps"] == 10


@pytest.mark.slow
def test_failed_stage_is_reported_with_its_log(ws, tmp_path, cluster):
    grid = write_grid(ws / "failing.yaml", families="[dt]", sizes="[t1]", transitions="[1500]", steps="3",
                      launcher="python", eval="{episodes: 1, actors: 1, args: ['--mode', 'sideways']}",
                      resources="{slurm: {cpus_per_node: 1, time: '10:00', poll_s: 1}}")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mambadm.grid", str(grid), "--out", str(out), "--parallel", "slurm",
                           "--wait"], cwd=REPO, env=cluster.env | {"MAMBADM_CONFIGS": str(ws / "configs")},
                          capture_output=True, text=True, timeout=300)
    cell = out / "cells" / "dt-t1-t1500-s0"
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cell {cell.name}: evaluation failed with exit code 2; log: {cell / 'eval.log'}" in done.stderr
    assert json.loads((out / "slurm" / "failed" / f"{cell.name}.json").read_text())["stage"] == "evaluation"
    assert (cell / "train.done").is_file() and not (cell / "row.json").exists()
