"""`ray job submit` end to end: the smoke experiment as a Ray job on a local head.

The head is a real `ray start --head` on 127.0.0.1 with its own temp dir, ports and auth
token, so it neither collides with nor is found by the `ray.init()` sessions of other tests
(`ray.init()` without an address only attaches to a head recorded in the *default* temp
dir). The test talks to it only through the Jobs API, as `ray job submit` does; it never
calls `ray.init` in this process.

Stopping: a plain `ray stop` kills every Ray process on the machine, other test runs'
included. Instead `ray start` runs in a new session, so every daemon it forks (GCS, raylet,
dashboard, agents, workers) shares that session id, and the fixture signals exactly the
processes of that session plus their descendants (the job's driver, which Ray starts in a
session of its own under the job supervisor): SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from latentforge.config import load_experiment
from latentforge.platform.pipeline import Pipeline
from latentforge.platform.stages import NAMES as STAGES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "experiments/smoke.yaml"  # relative: the job's cwd is the uploaded working dir
JOB_TIMEOUT_S = 600  # the smoke run takes about 70 s on 2 busy cores
# What `ray job submit --working-dir . --runtime-env-json '{"py_modules": ["src/latentforge"]}'`
# sends (README, "On a cluster"): the checkout as the job's cwd, and the package itself as a
# py_module so the job runs this tree's code even where an older latentforge is installed.
RUNTIME_ENV = {
    "working_dir": str(ROOT),
    "excludes": [".venv", ".git", "runs"],  # .rayignore says the same to the CLI
    "py_modules": [str(ROOT / "src" / "latentforge")],
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="stops the head via /proc"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> set[int]:
    """Live PIDs in session `sid` and all their descendants (Linux /proc; zombies skipped)."""
    parent, session = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid, _, sess = stat.rsplit(")", 1)[1].split()[:4]  # after "pid (comm)"
        if state != "Z":
            parent[int(entry)], session[int(entry)] = int(ppid), int(sess)
    found = {pid for pid, s in session.items() if s == sid}
    while more := {pid for pid, ppid in parent.items() if ppid in found} - found:
        found |= more
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the session's process tree, SIGKILL what is left after `grace_s`.

    GCS, raylet and the runtime-env agent outlive SIGTERM for 10+ s; a test head's state is
    disposable, so the grace period is short.
    """
    targets = session_processes(sid)  # now, while orphans still hang below their parents
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        targets |= session_processes(sid)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while any(map(alive, targets)) and time.monotonic() < deadline:
            time.sleep(0.5)
        targets = set(filter(alive, targets))
        if not targets and not session_processes(sid):
            return


@pytest.fixture(scope="module")
def ray_head():
    """A local head on 127.0.0.1 with token auth; yields (dashboard URL, auth headers)."""
    temp_dir = tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp")  # short: Unix socket paths
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",  # explicit: `ray start` enables it alone only if a token file exists
        RAY_AUTH_TOKEN=token,
        # The entrypoint runs with the head's PATH: put this venv's `latentforge` on it.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    dashboard_port = free_port()
    ports = {  # all free ports, so another Ray instance's defaults never collide with ours
        "port": free_port(),
        "dashboard-port": dashboard_port,
        "ray-client-server-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
        "node-manager-port": free_port(),
        "object-manager-port": free_port(),
    }
    ray_cli = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray_cli) if ray_cli.exists() else "ray",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,  # session id = proc.pid, inherited by every Ray daemon
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"ray start failed:\n{out[-4000:]}"
        url = f"http://127.0.0.1:{dashboard_port}"
        headers = {"Authorization": f"Bearer {token}"}
        yield url, headers
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_session(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def jobs_client(url: str, headers: dict, timeout_s: float = 60.0):
    """A JobSubmissionClient, retried while the dashboard finishes starting."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return JobSubmissionClient(url, headers=headers)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait_for_job(client, job_id: str, timeout_s: float) -> str:
    """Final status of the job; stops it and fails with its logs on timeout."""
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout_s} s:\n{logs(client, job_id)}")
        time.sleep(2)
    return str(status)


def logs(client, job_id: str, tail: int = 8000) -> str:
    return client.get_job_logs(job_id)[-tail:]


def test_jobs_api_requires_the_token(ray_head):
    url, headers = ray_head
    jobs_client(url, headers)  # waits for the dashboard
    http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, no proxy
    with pytest.raises(urllib.error.HTTPError) as e:
        http.open(f"{url}/api/jobs/", timeout=30)
    assert e.value.code == 401
    with http.open(urllib.request.Request(f"{url}/api/jobs/", headers=headers), timeout=30) as r:
        assert r.status == 200


def test_job_runs_the_submitted_code(ray_head):
    client = jobs_client(*ray_head)
    probe = "import latentforge; print('latentforge from', latentforge.__file__)"
    job_id = client.submit_job(entrypoint=f'python -c "{probe}"', runtime_env=RUNTIME_ENV)
    status = wait_for_job(client, job_id, timeout_s=120)
    out = logs(client, job_id)
    assert status == "SUCCEEDED", out
    assert "py_modules_files" in out, out  # the uploaded package, not the installed one


def test_smoke_experiment_as_a_job(ray_head, tmp_path):
    client = jobs_client(*ray_head)
    run_dir = tmp_path / "run"
    job_id = client.submit_job(
        entrypoint=f"latentforge run {SMOKE} run_dir={run_dir}",
        runtime_env=RUNTIME_ENV,
        metadata={"test": "test_jobs"},
    )
    status = wait_for_job(client, job_id, JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", f"job {job_id} {status}:\n{logs(client, job_id)}"

    # The job wrote every stage under the hashes this process computes for the same config.
    pipeline = Pipeline(load_experiment(ROOT / SMOKE, [f"run_dir={run_dir}"]))
    assert [s for s in STAGES if not pipeline.is_done(s)] == [], logs(client, job_id)
    assert (pipeline.stage_dir("tokenizer") / "model.safetensors").exists()
    assert (pipeline.stage_dir("evaluate") / "metrics.json").exists()
    for name in ("config.yaml", "report.html", "report.md"):
        assert (run_dir / name).stat().st_size > 0, name
    assert f"report: {run_dir / 'report.html'}" in logs(client, job_id)
