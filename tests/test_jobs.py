"""`ray job submit` end to end: the smoke experiment as a Ray job on a local head, and what
`latentforge run` prints there (each stage's start, progress and end, every line once; Ray's
own logs, progress bars and worker output in run_dir/ray.log, or on the console with
--ray-logs, checked by rerunning the job's run directory with the CLI in a fresh process).

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
import re
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
from collections import Counter
from pathlib import Path

import pytest

from latentforge.config import load_experiment
from latentforge.platform.pipeline import Pipeline
from latentforge.platform.stages import NAMES as STAGES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "experiments/smoke.yaml"  # relative: the job's cwd is the uploaded working dir
JOB_TIMEOUT_S = 600  # the smoke run takes about 70 s on 2 busy cores
TQDM_BAR = re.compile(r"[█▏▎▍▌▋▊▉]|\d+%\|")
PROGRESS = re.compile(r"^\[(tokenizer|generator)\] \d+/\d+ images \(\d+%\) \d+ img/s ETA \S+ ")
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


@pytest.fixture(scope="module")
def smoke_job(ray_head, tmp_path_factory):
    """The smoke experiment submitted as a job, its tokenizer given as weights (a random
    initialisation, ``train.tokenizer_images=0``): every stage still runs and prints, and
    the generator's Ray Train workers print the training progress. Returns the run
    directory, the job's final status and its logs."""
    from safetensors.torch import save_file

    from latentforge.models import build_tokenizer, state_dict_of

    run_dir = tmp_path_factory.mktemp("job") / "run"
    weights = run_dir.parent / "random-tokenizer.safetensors"
    save_file(state_dict_of(build_tokenizer(load_experiment(ROOT / SMOKE))), str(weights))
    given = ["train.tokenizer_images=0", f"tokenizer.weights={weights}"]
    client = jobs_client(*ray_head)
    job_id = client.submit_job(
        entrypoint=" ".join(["latentforge run", SMOKE, f"run_dir={run_dir}", *given]),
        runtime_env=RUNTIME_ENV,
        metadata={"test": "test_jobs"},
    )
    status = wait_for_job(client, job_id, JOB_TIMEOUT_S)
    return run_dir, given, status, client.get_job_logs(job_id)


def test_smoke_experiment_as_a_job(smoke_job):
    run_dir, given, status, out = smoke_job
    assert status == "SUCCEEDED", f"{status}:\n{out[-8000:]}"

    # The job wrote every stage under the hashes this process computes for the same config.
    pipeline = Pipeline(load_experiment(ROOT / SMOKE, [f"run_dir={run_dir}", *given]))
    assert [s for s in STAGES if not pipeline.is_done(s)] == [], out[-8000:]
    assert (pipeline.stage_dir("tokenizer") / "model.safetensors").exists()
    assert (pipeline.stage_dir("evaluate") / "metrics.json").exists()
    for name in ("config.yaml", "report.html", "report.md"):
        assert (run_dir / name).stat().st_size > 0, name
    assert f"report: {run_dir / 'report.html'}" in out


def test_console_shows_each_stage_and_progress_once_and_ray_goes_to_its_log(smoke_job):
    run_dir, _, status, console = smoke_job
    assert status == "SUCCEEDED", console[-8000:]
    lines = [line for line in console.splitlines() if line.strip()]
    for stage in STAGES:
        assert f"[{stage}] running -> {run_dir}/{stage}/" in console, stage
        assert re.search(rf"^\[{stage}\] done in [\d.]+ s$", console, re.M), stage
    # the training loop's lines, printed inside Ray Train workers, reach the console bare
    progress = [line for line in lines if PROGRESS.match(line)]
    assert any(line.startswith("[generator] 512/512 images (100%)") for line in progress)
    assert not TQDM_BAR.search(console)
    for noise in ("Running Dataset", "Starting execution of Dataset", "pid=", "core_worker"):
        assert noise not in console, noise
    assert [line for line, n in Counter(lines).items() if n > 1] == []
    assert f"Ray's logs -> {run_dir}/ray.log" in console

    log = (run_dir / "ray.log").read_text()
    assert "Starting execution of Dataset" in log  # Ray Data's driver-side records
    assert "(RayTrainWorker pid=" in log  # the workers' lines, with Ray's prefix
    assert all(line in log for line in progress)


def test_ray_logs_flag_brings_ray_output_back_to_the_console(smoke_job):
    """The CLI as a person runs it, in a fresh process (a local Ray instance of its own),
    on the job's run directory: only sampling, evaluation and the report run again."""
    run_dir, given, status, _ = smoke_job
    assert status == "SUCCEEDED"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [sys.executable, "-m", "latentforge.cli", "run", SMOKE, f"run_dir={run_dir}", *given]
    cmd += ["sample.num_images=32", "--ray-logs"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    console = out.stdout + out.stderr
    assert "[generator] cached: " in console and "[sample] done in " in console
    assert "Started a local Ray instance" in console  # Ray's own log records
    assert re.search(r"\(_sample_chunk pid=\d+\)\S* \[sample\] 32/32 images", console)
