"""Real multi-node Ray on this machine: a two-node cluster (``ray start`` twice), and the cluster launcher flow
``ray up / ray submit / ray down`` with cluster/eval.yaml over ssh to 127.0.0.1 (Debian's sshd, throwaway keys).

Both start their Ray processes with a private ``--temp-dir`` and stop exactly those processes by pid at the end
(``ray stop`` would stop every Ray on the machine)."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our private Ray temp dir)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def stop_ray_processes(*markers: str) -> None:
    """Stops the processes of our cluster: those naming its private temp dir or its GCS address."""
    def ours() -> set[int]:
        return {pid for m in markers for pid in pids_using(m)}

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while ours() and time.time() < deadline:
            time.sleep(0.3)


@pytest.fixture
def ray_temp():
    """A short private Ray temp dir (socket paths must stay under ~107 characters)."""
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield d
    stop_ray_processes(d)
    shutil.rmtree(d, ignore_errors=True)


def token_env() -> dict:
    return os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "OMP_NUM_THREADS": "1"}


def test_two_node_cluster_runs_actors_on_both_nodes(tmp_path, ray_temp):
    env, port = token_env(), free_port()
    try:
        two_node_cluster(tmp_path, ray_temp, env, port)
    finally:
        stop_ray_processes(ray_temp, f":{port} ")


def two_node_cluster(tmp_path, ray_temp, env, port):
    ray = str(VENV_BIN / "ray")
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    subprocess.run([ray, "start", "--head", f"--port={port}", f"--temp-dir={ray_temp}", "--include-dashboard=false",
                    "--resources", '{"head_node": 1}', *common], env=env, check=True, capture_output=True, timeout=120)
    subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", "--resources", '{"second_node": 1}', *common],
                   env=env, check=True, capture_output=True, timeout=120)
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--random-env", "hopper", "--address",
                           f"127.0.0.1:{port}", "--episodes", "3", "--actors", "2", "--output", str(out),
                           "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert sorted((e["target"], e["index"]) for e in res["episodes"]) == [(t, i) for t in (1800.0, 3600.0)
                                                                        for i in range(3)]
    labels = {tuple(e["node_resources"]) for e in res["episodes"]}
    assert labels == {("head_node",), ("second_node",)}, labels
    assert len({e["node_id"] for e in res["episodes"]}) == 2
    # without the token the cluster refuses a driver
    bad = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}')"],
                         env=env | {"RAY_AUTH_TOKEN": "0" * 64}, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0


SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture
def sshd(tmp_path):
    """Debian's sshd in inetd mode (``sshd -i``) behind ssh's ProxyCommand: Ray's launcher has no ssh port
    setting, and a per-connection sshd needs no free port or daemon; host and user keys are throwaway."""
    if not (Path(SSHD).exists() and shutil.which("ssh") and shutil.which("rsync")):
        pytest.skip("sshd, ssh or rsync is not installed (scripts/setup.sh installs openssh-server and rsync)")
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "user.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"HostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nStrictModes no\n"
        "UsePAM no\nPidFile none\nSubsystem sftp internal-sftp\n")
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    except OSError as e:
        pytest.skip(f"cannot create /run/sshd for sshd: {e}")
    proxy = f"{SSHD} -i -f {d / 'sshd_config'}"
    probe = subprocess.run(["ssh", "-i", str(d / "user"), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", "-o", f"ProxyCommand={proxy}",
                            f"{os.environ.get('USER', 'root')}@127.0.0.1", "echo ready"],
                           capture_output=True, text=True, timeout=60)
    if "ready" not in probe.stdout:
        pytest.skip(f"sshd could not be started: {probe.stderr.strip()[-300:]}")
    return {"key": str(d / "user"), "proxy": proxy}


def test_ray_up_submit_down_with_cluster_yaml(tmp_path, sshd, ray_temp):
    home = Path.home()
    remote = tmp_path / "remote" / "mambadm"
    port = free_port()
    cfg = yaml.safe_load((REPO / "cluster" / "eval.yaml").read_text())
    cfg["cluster_name"] = f"mambadm-test-{secrets.token_hex(3)}"
    cfg["auth"] = {"ssh_user": os.environ.get("USER", "root"), "ssh_private_key": sshd["key"],
                   "ssh_proxy_command": sshd["proxy"]}
    cfg["file_mounts"] = {str(remote): str(REPO), "~/.ray/auth_token": "~/.ray/auth_token"}

    def local(cmd: str) -> str:  # same commands, with the project synced into tmp instead of ~/mambadm
        return cmd.replace("~/mambadm", str(remote)).replace("$HOME/mambadm", str(remote))

    # The CI machine already holds the venv: link it instead of running scripts/setup.sh (a network install).
    assert cfg["setup_commands"][0] == "cd ~/mambadm && bash scripts/setup.sh"
    cfg["setup_commands"] = [f"ln -sfn {REPO / '.venv'} {remote / '.venv'}"] + [local(c) for c in cfg["setup_commands"][1:]]
    cfg["head_start_ray_commands"] = [local(c).replace("--port=6379", f"--port={port} --temp-dir={ray_temp} "
                                                       "--num-cpus=2 --include-dashboard=false")
                                      for c in cfg["head_start_ray_commands"]]
    cfg["worker_start_ray_commands"] = [local(c) for c in cfg["worker_start_ray_commands"]]
    cluster_yaml = tmp_path / "eval.yaml"
    cluster_yaml.write_text(yaml.safe_dump(cfg))

    env = os.environ | {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(VENV_BIN / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    touched = [home / n for n in (".mambadm-python", "evaluate.py", "ray_bootstrap_config.yaml", "ray_bootstrap_key.pem")]
    saved = {p: p.read_bytes() for p in touched if p.exists()}
    out = tmp_path / "results.json"
    try:
        up = subprocess.run([ray, "up", str(cluster_yaml), "--yes", "--no-config-cache"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=400)
        (tmp_path / "up.log").write_text(up.stdout + up.stderr)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        assert (remote / "evaluation" / "evaluate.py").is_file() and not (remote / ".git").exists()
        sub = subprocess.run([ray, "submit", str(cluster_yaml), "evaluation/evaluate.py", "--", "--random-env",
                              "hopper", "--address", "auto", "--episodes", "2", "--actors", "2", "--output", str(out),
                              "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert sub.returncode == 0 and out.exists(), (sub.stdout + sub.stderr)[-4000:]
        assert "| hopper | 3600 | 2 |" in sub.stdout
        res = json.loads(out.read_text())
        assert len(res["episodes"]) == 4 and {tuple(e["node_resources"]) for e in res["episodes"]} == {("eval_head",)}
    finally:
        stop_ray_processes(ray_temp, f":{port} ")
        down = subprocess.run([ray, "down", str(cluster_yaml), "--yes"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        for p in touched:
            if p in saved:
                p.write_bytes(saved[p])
            elif p.exists():
                p.unlink()
    assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
