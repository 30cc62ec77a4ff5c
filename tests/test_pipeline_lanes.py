"""scripts/run_pipeline.sh's two lanes, with a stand-in Python that records each phase script's start and end:
GRPO runs beside the reward model and the evaluation of base and SFT, a failure in either lane stops the
pipeline with one line, and LANES=1 keeps the phases in order. (The real phases run in test_pipeline.py.)"""

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT

# Stand-in for $PY: `-c` snippets (the done-tests, the reward-mix check) run in the real interpreter;
# a phase script is logged, leaves its done-marker, sleeps $SLEEP_<script> seconds and fails when $FAIL names it.
FAKE = """#!/usr/bin/env bash
[[ $1 == -c ]] && exec {python} "$@"
via=""  # -m LAUNCHER ARGS... SCRIPT.py: recorded after the script's own arguments
if [[ $1 == -m ]]; then via=" via $2"; shift 2; while [[ $1 != *.py ]]; do via+=" $1"; shift; done; fi
script=${{1%.py}}
echo "$(date +%s.%N) start $*$via" >> "$CALLS"
var=SLEEP_$script; sleep "${{!var:-0}}"
if [[ ${{FAIL:-}} == "$script" ]]; then echo "boom in $script" >&2; exit 3; fi
case $script in
  sft_train) mkdir -p "$ECG_MODELS_DIR/sft" && touch "$ECG_MODELS_DIR/sft/.complete" ;;
  reward_model) mkdir -p "$ECG_MODELS_DIR/reward" && touch "$ECG_MODELS_DIR/reward/.complete" ;;
  grpo_train) mkdir -p "$ECG_MODELS_DIR/rlhf" && touch "$ECG_MODELS_DIR/rlhf/.complete" ;;
esac
echo "$(date +%s.%N) end $script" >> "$CALLS"
"""


def pipeline(tmp, lanes="2", fail="", rm_weight=0.0, sleep=None, timeout=120, launch=None):
    py = tmp / "python"
    if not py.exists():
        py.write_text(FAKE.format(python=sys.executable))
        py.chmod(0o755)
        cfg = tmp / "configs"
        shutil.copytree(ROOT / "configs/cpu", cfg)
        grpo = yaml.safe_load((cfg / "grpo.yaml").read_text())
        grpo["rewards"]["reward_model"] = rm_weight
        grpo["reward_model"] = "reward" if rm_weight else None
        (cfg / "grpo.yaml").write_text(yaml.safe_dump(grpo))
    env = {**os.environ, "PYTHON": str(py), "CFG_DIR": str(tmp / "configs"), "RAW_DIR": str(tmp),
           "ECG_MODELS_DIR": str(tmp / "models"), "PROCESSED_DIR": str(tmp / "processed"),
           "REPORTS_DIR": str(tmp / "reports"), "RECIPE": "fake", "LANES": lanes, "FAIL": fail,
           "CALLS": str(tmp / "calls.log"), "CUDA_VISIBLE_DEVICES": "",  # a CPU machine, whatever runs this
           **{f"SLEEP_{k}": str(v) for k, v in (sleep or {}).items()},
           **({"LAUNCH": f"{py} {launch}"} if launch else {})}
    r = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r, read_calls(tmp)


def read_calls(tmp):
    if not (tmp / "calls.log").exists():
        return []
    lines = [line.split(" ", 2) for line in (tmp / "calls.log").read_text().splitlines()]
    return [(float(t), what, rest) for t, what, rest in lines]


def when(calls, what, script):
    return next(t for t, w, rest in calls if w == what and rest.startswith(script))


def test_grpo_runs_beside_the_reward_model_and_the_first_evaluation(tmp_path):
    r, calls = pipeline(tmp_path, sleep={"grpo_train": 2})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    starts = [rest for _, w, rest in calls if w == "start"]
    grpo = next(s for s in starts if s.startswith("grpo_train.py"))
    assert grpo.endswith(f"--num-threads {threads}")
    # the side lane starts and ends while GRPO trains, on its share of the cores
    for script in ("reward_model.py", "evaluate.py --config"):
        assert when(calls, "start", "grpo_train") <= when(calls, "start", script) + 1 < when(calls, "end", "grpo_train")
    side = [s for s in starts if s.startswith(("reward_model.py", "evaluate.py"))]
    assert all(s.endswith(f"--num-threads {threads}") for s in side[:2]), side
    assert "--models base,sft --num-threads" in side[1]
    # the last evaluation, after GRPO, reuses the cached base and SFT answers and answers with GRPO's model
    # in two processes on the same share of the cores each
    assert starts[-1].startswith("evaluate.py") and "--models base,sft,rlhf" in starts[-1]
    assert starts[-1].endswith(f"--num-threads {threads} via torch.distributed.run --standalone --nproc-per-node 2")
    assert when(calls, "start", "evaluate.py --config") < when(calls, "end", "grpo_train") < calls[-1][0]
    assert "[side lane] reward model, evaluation of base and SFT" in r.stdout
    assert "eval-base-sft: finished" in r.stdout   # the side lane's phase lines reach the terminal


def test_a_reward_model_in_grpos_mix_is_trained_first(tmp_path):
    r, calls = pipeline(tmp_path, rm_weight=1.0)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert when(calls, "end", "reward_model") < when(calls, "start", "grpo_train")
    reward = next(rest for _, w, rest in calls if w == "start" and rest.startswith("reward_model.py"))
    assert "--num-threads" not in reward   # alone, on every core
    assert "[side lane] evaluation of base and SFT" in r.stdout


def test_a_failing_side_lane_fails_the_pipeline_with_its_log(tmp_path):
    r, calls = pipeline(tmp_path, fail="reward_model")
    assert r.returncode == 1
    assert "error: the side lane failed" in r.stderr and "side-lane.log" in r.stderr and "boom" in r.stderr
    assert not any(rest.startswith("evaluate.py") for _, _, rest in calls)   # nothing ran after the failure


def test_a_failing_grpo_stops_the_side_lane(tmp_path):
    t0 = time.time()
    r, calls = pipeline(tmp_path, fail="grpo_train", sleep={"grpo_train": 2, "reward_model": 30})
    assert r.returncode == 3 and "boom in grpo_train" in r.stderr
    assert any(w == "start" and rest.startswith("reward_model") for _, w, rest in calls)
    assert time.time() - t0 < 25   # the 30-second reward model was not waited for
    time.sleep(1)
    assert not any(w == "end" and rest.startswith("reward_model") for _, w, rest in read_calls(tmp_path))


def test_one_lane_keeps_the_phases_in_order(tmp_path):
    r, calls = pipeline(tmp_path, lanes="1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    order = [rest.split()[0] for _, w, rest in calls if w == "start"]
    assert order == ["prepare_data.py", "sft_train.py", "reward_model.py", "grpo_train.py", "evaluate.py"]
    assert not any("--num-threads" in rest for _, _, rest in calls)
    assert "side lane" not in r.stdout


def test_auto_picks_two_lanes_on_a_cpu_with_two_cores(tmp_path):
    """The default with no GPU in sight: two lanes wherever there are two cores."""
    r, calls = pipeline(tmp_path, lanes="auto")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    two = len(os.sched_getaffinity(0)) >= 2  # what nproc counts
    assert ("[side lane]" in r.stdout) == two
    assert any("--num-threads" in rest for _, _, rest in calls) == two


def test_a_launcher_starts_training_and_the_evaluation(tmp_path):
    """LAUNCH (accelerate launch on several GPUs) starts the training phases and the evaluation, whose
    processes share the generation; data preparation runs once. A launcher means one lane."""
    launch = "-m accelerate.commands.launch --num_processes 2"
    r, calls = pipeline(tmp_path, lanes="auto", launch=launch)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    starts = [rest for _, w, rest in calls if w == "start"]
    assert [s.split()[0] for s in starts] == ["prepare_data.py", "sft_train.py", "reward_model.py", "grpo_train.py",
                                              "evaluate.py"]
    assert "via" not in starts[0] and all(s.endswith("via accelerate.commands.launch --num_processes 2")
                                          for s in starts[1:])


@pytest.mark.parametrize("lanes", ["3", "two"])
def test_bad_lanes_is_one_line(tmp_path, lanes):
    r, calls = pipeline(tmp_path, lanes=lanes)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"error: LANES={lanes}: expected 1, 2 or auto"
    assert calls == []   # refused before any phase ran
