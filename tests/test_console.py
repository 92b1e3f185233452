"""What `latentforge run` prints: each stage's start, progress and end, every line once; Ray's
own logs, progress bars and worker output in run_dir/ray.log, or on the console with
--ray-logs. The real entry point in a subprocess, as a person runs it."""

import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from tests.test_config import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"
TQDM_BAR = re.compile(r"[█▏▎▍▌▋▊▉]|\d+%\|")
PROGRESS = re.compile(r"^\[(tokenizer|generator)\] \d+/\d+ images \(\d+%\) \d+ img/s ETA \S+ ")


def latentforge(*args: str) -> str:
    """Run the CLI in a fresh process (no ambient cluster); its stdout + stderr."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    out = subprocess.run(
        [sys.executable, "-m", "latentforge.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke experiment with its tokenizer given as weights (a random initialisation,
    ``train.tokenizer_images=0``): every stage still runs and prints, and the generator's
    Ray Train workers print the training progress, one TorchTrainer start cheaper."""
    from safetensors.torch import save_file

    from latentforge.config import load_experiment
    from latentforge.models import build_tokenizer, state_dict_of

    run_dir = tmp_path_factory.mktemp("console")
    weights = run_dir / "random-tokenizer.safetensors"
    save_file(state_dict_of(build_tokenizer(load_experiment(SMOKE))), str(weights))
    given = ["train.tokenizer_images=0", f"tokenizer.weights={weights}"]
    return run_dir, latentforge("run", str(SMOKE), f"run_dir={run_dir}", *given)


@pytest.mark.slow
def test_console_shows_each_stage_and_progress_once_and_ray_goes_to_its_log(smoke_run):
    from latentforge.platform.stages import NAMES

    run_dir, console = smoke_run
    lines = [line for line in console.splitlines() if line.strip()]
    for stage in NAMES:
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


@pytest.mark.slow
def test_ray_logs_flag_brings_ray_output_back_to_the_console(smoke_run):
    run_dir, _ = smoke_run
    # only sampling, evaluation and the report run again: Ray tasks and Ray Data
    weights = run_dir / "random-tokenizer.safetensors"
    given = ["train.tokenizer_images=0", f"tokenizer.weights={weights}"]
    console = latentforge(
        "run", str(SMOKE), f"run_dir={run_dir}", *given, "sample.num_images=32", "--ray-logs"
    )
    assert "[generator] cached: " in console and "[sample] done in " in console
    assert "Started a local Ray instance" in console  # Ray's own log records
    assert re.search(r"\(_sample_chunk pid=\d+\)\S* \[sample\] 32/32 images", console)
