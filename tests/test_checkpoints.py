"""Long runs: checkpoints, --resume, a clean stop on SIGINT / SIGTERM, and save paths that lose nothing.

Every script (the four RL loops and sft.py) reaches the run's lifecycle (common/run.py) through its own
calls and hands it its own loop state, so every script is run: a run stopped (by a signal, or a crash) and
resumed logs exactly what a run that was never stopped logs, and ends with the same weights.
"""

import errno
import glob
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from common import checkpoint, stopping, tasks
from conftest import (RL_SCRIPTS, ROOT, Spy, read_tensorboard, run_script_in_process, save_tiny_causal_lm, set_flags,
                      sft_args, task_args, write_jsonl)

SCRIPTS = [*RL_SCRIPTS, "sft.py"]
# a helper each loop calls a known number of times per iteration (sft.py: per step, one per micro-batch)
STEP_HELPER = {script: ("kl_penalized_rewards", 1) for script in RL_SCRIPTS} | {"sft.py": ("sft_loss", 2)}


def four_step_args(assets, script):
    """4 iterations (sft.py: steps), evaluated every 2, a checkpoint every 2. The state has to carry
    everything: the adaptive KL coefficient moves, the guided scripts mix (beta 0.5, their own random
    stream), D2LOLS changes phase after iteration 3."""
    if script == "sft.py":
        return set_flags(sft_args(assets, "imdb", steps=4), "--eval-every", 2, "--save-every", 2)
    args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 16, "--eval-every", 2, "--save-every", 2,
                     "--kl-target", 0.5, "--kl-horizon", 100)
    if script != "ppo.py":
        args = set_flags(args, "--beta", 0.5)
    if script == "d2lols.py":
        args = set_flags(args, "--tau", 3)
    return args


class StopIn(Spy):
    """Wraps a helper the loop calls `per_step` times a step: during step `step` it sends this process (or
    `pid`) SIGINT (what Ctrl-C does), raises (a crash), or sends SIGKILL (kill)."""

    def __init__(self, step, per_step, how, pid=None):
        super().__init__()
        self.at_call, self.how, self.pid = step * per_step, how, pid

    def wrap(self, function):
        recorded = super().wrap(function)

        def wrapper(*args, **kwargs):
            result = recorded(*args, **kwargs)
            if len(self.calls) == self.at_call:
                if self.how == "crash":
                    raise RuntimeError("the machine went away")
                if self.how == "kill":  # (an OOM kill, a lost node: nothing runs after it)
                    os.kill(self.pid or os.getpid(), signal.SIGKILL)
                os.kill(self.pid or os.getpid(), signal.SIGINT)
            return result

        return wrapper


def logged(events):
    """Every scalar as (step, value) per tag, timing aside (nan compares equal to nan)."""
    return {tag: [(e.step, "nan" if math.isnan(e.value) else e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if not tag.startswith("timing/") and tag != "charts/eps"}


def checkpoint_folders(cwd):
    return sorted(glob.glob(os.path.join(cwd, "checkpoints", "*")))


@pytest.mark.parametrize("how", ["signal", "crash"])
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.slow
def test_a_stopped_and_resumed_run_logs_exactly_what_an_uninterrupted_run_logs(assets, tmp_path, capsys, script, how):
    """signal: SIGINT during step 1 ends the step, writes a checkpoint (the signal's alone: --save-every is 2)
    and exits non-zero with the resume command. crash: an exception in step 4, after step 2's checkpoint and
    step 3's logs (on disk: the writer flushes every 2 minutes). Resumed, TensorBoard shows one value per
    step, identical to the uninterrupted run's, and the weights end identical."""
    args = four_step_args(assets, script)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    uninterrupted = run_script_in_process(script, args, whole)
    [final] = checkpoint_folders(whole)  # the latest only: no .tmp or .old beside it
    assert sorted(os.listdir(final)) == sorted(
        ["optimizer.pt", "state.json"] + [f"{name}.safetensors" for name in uninterrupted["trained_models"]]
        if script != "sft.py" else ["optimizer.pt", "state.json", "model.safetensors"])

    helper, per_step = STEP_HELPER[script]
    with pytest.raises((SystemExit, RuntimeError)) as stop:
        run_script_in_process(script, args, stopped, {helper: StopIn(1 if how == "signal" else 4, per_step, how)})
    [folder] = checkpoint_folders(stopped)
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    assert state["step" if script == "sft.py" else "iteration"] == (1 if how == "signal" else 2)
    if how == "signal":
        message = capsys.readouterr().err.strip()
        assert stop.type is SystemExit and stop.value.code == 130  # the shell's code for SIGINT
        assert message.startswith("stopped by SIGINT after ")
        relative = os.path.relpath(folder, stopped)
        assert f"checkpoint: {relative}\nresume with: python {script} " in message
        assert message.endswith(f" --resume {relative}")
    # crash: step 3's events are on disk (run_script_in_process closes the writer of a script that raised)

    resumed = run_script_in_process(script, args + ["--resume", os.path.relpath(folder, stopped)], stopped)
    expected, got = logged(read_tensorboard(whole)), logged(read_tensorboard(stopped))
    assert got == expected
    model = "model" if script == "sft.py" else "policy"
    for a, b in zip(uninterrupted[model].parameters(), resumed[model].parameters()):
        assert torch.equal(a, b)
    [folder] = checkpoint_folders(stopped)
    with open(os.path.join(folder, "state.json")) as f:
        assert json.load(f)["step" if script == "sft.py" else "iteration"] == 4


@pytest.mark.parametrize("script", ["ppo.py", "sft.py"])
@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues_with_the_same_command(assets, tmp_path, capsys, script):
    """--resume auto --checkpoint-dir ck, one command for a run's first launch and every restart (as torchrun
    --max-restarts relaunches it): nothing in ck, a fresh start; stopped, the very same command continues from ck
    and ends as a run never stopped; the same command with another flag, or without --checkpoint-dir, is refused
    in one line."""
    args = four_step_args(assets, script)
    auto = args + ["--resume", "auto", "--checkpoint-dir", "ck"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    uninterrupted = run_script_in_process(script, args, whole)
    helper, per_step = STEP_HELPER[script]
    with pytest.raises(SystemExit) as stop:
        run_script_in_process(script, auto, stopped, {helper: StopIn(1, per_step, "signal")})
    assert stop.value.code == 130 and "--resume auto: no checkpoint in ck yet: a fresh start" in capsys.readouterr().out
    resumed = run_script_in_process(script, auto, stopped)  # the same command, relaunched
    assert logged(read_tensorboard(stopped)) == logged(read_tensorboard(whole))
    model = "model" if script == "sft.py" else "policy"
    for a, b in zip(uninterrupted[model].parameters(), resumed[model].parameters()):
        assert torch.equal(a, b)
    message = run_error(script, set_flags(auto, "--learning-rate", 0.5), stopped)
    assert message.startswith("error: --resume auto: the checkpoint in ck was made with other flags (--learning-rate ")
    assert run_error(script, args + ["--resume", "auto"], stopped).startswith(
        "error: --resume auto needs --checkpoint-dir")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.slow
def test_a_signal_without_checkpoints_says_so_and_exits_non_zero(assets, tmp_path, capsys, script):
    args = set_flags(four_step_args(assets, script), "--save-every", 0)
    helper, per_step = STEP_HELPER[script]
    with pytest.raises(SystemExit) as stop:
        run_script_in_process(script, args, tmp_path, {helper: StopIn(1, per_step, "signal")})
    assert stop.value.code == 130 and capsys.readouterr().err.strip() == (
        f"stopped by SIGINT after {'step 1/4' if script == 'sft.py' else 'iteration 1/4'}, without a checkpoint "
        "(--save-every 0): nothing to resume from")
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.slow
def test_a_signal_in_the_last_step_ends_the_run_as_usual(assets, tmp_path, script):
    """Nothing is left to resume: the run ends with its checkpoint and --save-model, exit status 0."""
    helper, per_step = STEP_HELPER[script]
    args = four_step_args(assets, script) + ["--save-model", "--save-path", "final"]
    run_script_in_process(script, args, tmp_path, {helper: StopIn(4, per_step, "signal")})
    assert os.path.isfile(tmp_path / "final" / "model.safetensors")
    [folder] = checkpoint_folders(tmp_path)
    with open(os.path.join(folder, "state.json")) as f:
        assert json.load(f)["step" if script == "sft.py" else "iteration"] == 4


@pytest.mark.slow
def test_sft_eval_only_does_not_take_resume(assets, tmp_path, ppo_checkpoint):
    assert resume_error("sft.py", sft_args(assets, "imdb") + ["--eval-only", "--resume", ppo_checkpoint], tmp_path) == \
        "error: --eval-only evaluates --model-name-or-path; --resume continues a training run"


def start(command, cwd):
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def signal_after_first_step(process, signum, marker):
    """Wait for the first line that starts with `marker` (a finished step), send `signum`, and return
    (stdout, stderr) once the process ends."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(marker):
            process.send_signal(signum)
            break
    out, err = process.communicate(timeout=120)
    return "".join(lines) + out, err


@pytest.mark.parametrize("script,signum", [("ppo.py", signal.SIGINT), ("ppo_plus_plus.py", signal.SIGTERM),
                                           ("sft.py", signal.SIGINT)])
@pytest.mark.slow
def test_a_signalled_process_checkpoints_prints_how_to_resume_and_exits_without_a_traceback(assets, tmp_path, script,
                                                                                           signum):
    """A real process, as Ctrl-C or a scheduler stops it: the step ends, a checkpoint is written, the
    command that continues the run is printed, the exit status is the shell's for the signal (130, 143; it was 1)
    and there is no traceback. ppo.py's printed command is run, and stopped again: it continues from the checkpoint
    and stops with one --resume."""
    if script == "sft.py":
        args = set_flags(sft_args(assets, "imdb"), "--max-steps", 1000, "--eval-every", 0, "--save-every", 500)
        marker = "step 1/"
    else:
        args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 4000, "--eval-every", 0,
                         "--save-every", 500)
        marker = "iteration 1/"
    name = signal.Signals(signum).name
    process = start([sys.executable, os.path.join(ROOT, script), *args], tmp_path)
    out, err = signal_after_first_step(process, signum, marker)
    assert "Traceback" not in err, err
    assert process.returncode == 128 + signum  # the shell's code for the signal (130 SIGINT, 143 SIGTERM)
    assert f"{name}: finishing this step, then stopping" in out
    [folder] = checkpoint_folders(tmp_path)
    with open(os.path.join(folder, "state.json")) as f:
        stopped_at = json.load(f)["step" if script == "sft.py" else "iteration"]
    assert 1 <= stopped_at < 500
    lines = err.strip().splitlines()
    assert lines[-2] == (f"stopped by {name} after {'step' if script == 'sft.py' else 'iteration'} {stopped_at}/1000; "
                         f"checkpoint: {os.path.relpath(folder, tmp_path)}")
    assert lines[-1].startswith("resume with: python ")
    if script != "ppo.py":
        return
    command = shlex.split(lines[-1][len("resume with: ") :])
    assert command[-2:] == ["--resume", os.path.relpath(folder, tmp_path)]
    out, err = signal_after_first_step(start([sys.executable, *command[1:]], tmp_path), signum, marker="iteration ")
    assert f"resumed {os.path.basename(folder)} at iteration {stopped_at} from" in out
    assert f"iteration {stopped_at + 1}/1000" in out
    assert "Traceback" not in err, err
    resume_command = shlex.split(err.strip().splitlines()[-1][len("resume with: ") :])
    assert resume_command.count("--resume") == 1 and resume_command == command
    [folder] = checkpoint_folders(tmp_path)
    with open(os.path.join(folder, "state.json")) as f:
        assert json.load(f)["iteration"] > stopped_at


@pytest.fixture(scope="module")
def ppo_checkpoint(assets, tmp_path_factory):
    """A ppo.py run of 2 iterations with a checkpoint after each."""
    cwd = tmp_path_factory.mktemp("ppo_checkpoint")
    run_script_in_process("ppo.py", set_flags(task_args(assets, "imdb"), "--eval-every", 0, "--save-every", 1), cwd)
    [folder] = checkpoint_folders(cwd)
    return folder


def resume_error(script, args, cwd):
    with pytest.raises(SystemExit) as error:
        run_script_in_process(script, args, cwd)
    message = str(error.value.code)
    assert "\n" not in message and message.startswith("error: "), message
    return message


def test_a_checkpoint_of_another_script_task_or_size_fails_with_one_line(assets, tmp_path, ppo_checkpoint):
    args = set_flags(task_args(assets, "imdb"), "--eval-every", 0, "--resume", ppo_checkpoint)
    assert resume_error("ppo_plus_plus.py", set_flags(task_args(assets, "imdb", "ppo_plus_plus.py"), "--resume",
                                                      ppo_checkpoint), tmp_path) == \
        f"error: --resume {ppo_checkpoint}: a checkpoint of ppo.py, not of ppo_plus_plus.py"
    assert resume_error("sft.py", sft_args(assets, "imdb") + ["--resume", ppo_checkpoint], tmp_path) == \
        f"error: --resume {ppo_checkpoint}: a checkpoint of ppo.py, not of sft.py"
    assert resume_error("ppo.py", set_flags(task_args(assets, "tldr"), "--resume", ppo_checkpoint), tmp_path) == \
        f"error: --resume {ppo_checkpoint}: the checkpoint has --task imdb, this run tldr"
    assert resume_error("ppo.py", set_flags(args, "--batch-size", 2, "--num-minibatches", 1), tmp_path) == \
        f"error: --resume {ppo_checkpoint}: the checkpoint has --batch-size 4, this run 2"
    assert resume_error("ppo.py", set_flags(args, "--total-episodes", 16), tmp_path) == \
        f"error: --resume {ppo_checkpoint}: the checkpoint has --total-episodes 8, this run 16"
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for split in ("train", "test"):
        with open(os.path.join(assets["data"]["imdb"], f"{split}.jsonl")) as f:
            write_jsonl(fewer / f"{split}.jsonl", [json.loads(line) for line in f][:10])
    assert resume_error("ppo.py", set_flags(args, "--dataset-path", fewer), tmp_path) == \
        f"error: --resume {ppo_checkpoint}: the checkpoint's run had 32 training rows, this run has 8 (another dataset)"
    assert resume_error("ppo.py", set_flags(args, "--resume", tmp_path), tmp_path).startswith(
        f"error: --resume {tmp_path}: not a checkpoint folder")
    assert not os.path.exists(tmp_path / "runs")  # every check above came before any model loaded
    wider = save_tiny_causal_lm(tmp_path / "wider", assets["tokenizer"], n_embd=48)
    assert resume_error("ppo.py", set_flags(args, "--model-name-or-path", wider), tmp_path).startswith(
        f"error: --resume {ppo_checkpoint}: its policy does not fit this run's model (size mismatch for ")


def test_changed_flags_are_listed_on_resume(assets, tmp_path, ppo_checkpoint, capsys):
    args = set_flags(task_args(assets, "imdb"), "--eval-every", 0, "--save-every", 1, "--resume", ppo_checkpoint,
                     "--rollout-batch-size", 2)
    shutil.copytree(os.path.dirname(ppo_checkpoint), tmp_path / "checkpoints")
    run_script_in_process("ppo.py", args, tmp_path)
    assert "resuming with flags changed from the checkpoint's: --rollout-batch-size 3 -> 2" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.slow
def test_a_checkpoint_dir_that_holds_something_else_fails_before_training(assets, tmp_path, script, ppo_checkpoint):
    args = sft_args(assets, "imdb") if script == "sft.py" else task_args(assets, "imdb", script)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert resume_error(script, set_flags(args, "--save-every", 1, "--checkpoint-dir", "mine"), tmp_path) == \
        "error: --checkpoint-dir mine holds files that are not a checkpoint; choose another folder"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    other_run = json.load(open(os.path.join(ppo_checkpoint, "state.json")))["run_name"]
    assert resume_error(script, set_flags(args, "--save-every", 1, "--checkpoint-dir", ppo_checkpoint), tmp_path) == \
        f"error: --checkpoint-dir {ppo_checkpoint} holds the checkpoint of run {other_run}; continue it with " \
        "--resume, or choose another folder"
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.slow
def test_save_model_never_mixes_the_model_into_a_folder_that_holds_something_else(assets, tmp_path, script):
    args = sft_args(assets, "imdb") if script == "sft.py" else task_args(assets, "imdb", script)
    args = args + ["--save-model"]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a,b\n")
    assert resume_error(script, args + ["--save-path", "results"], tmp_path) == \
        "error: --save-path results is not empty and does not hold a previous model; choose an empty or new folder"
    assert (tmp_path / "results" / "table.csv").read_text() == "a,b\n"
    assert resume_error(script, args + ["--save-path", assets["policy"]], tmp_path) == \
        f"error: --save-path {assets['policy']} is the folder of a model this run reads; choose another folder"
    assert not os.path.exists(tmp_path / "runs")  # before training


@pytest.mark.slow
def test_save_model_replaces_a_previous_model(assets, tmp_path):
    shutil.copytree(assets["policy"], tmp_path / "previous")
    before = os.path.getmtime(tmp_path / "previous" / "model.safetensors")
    args = set_flags(task_args(assets, "imdb"), "--eval-every", 0)
    run_script_in_process("ppo.py", args + ["--save-model", "--save-path", "previous"], tmp_path)
    assert os.path.getmtime(tmp_path / "previous" / "model.safetensors") > before


def test_check_save_path_accepts_only_new_empty_or_previous_causal_lm_folders(assets, tmp_path):
    tasks.check_save_path(None)
    tasks.check_save_path(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    tasks.check_save_path(str(tmp_path / "empty"))
    tasks.check_save_path(assets["policy"])  # a previous model (not one this run reads)
    for other in (assets["classifier"], str(tmp_path / "nested")):  # another kind of model; a model in a tree
        if other.endswith("nested"):
            shutil.copytree(assets["policy"], tmp_path / "nested" / "inner")
            shutil.copy(os.path.join(assets["policy"], "config.json"), tmp_path / "nested")
            shutil.copy(os.path.join(assets["policy"], "model.safetensors"), tmp_path / "nested")
        with pytest.raises(SystemExit, match="does not hold a previous model"):
            tasks.check_save_path(other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        tasks.check_save_path(str(tmp_path / "file"))


def tiny_training_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    model[1].weight = nn.Parameter(model[0].weight.T.contiguous())  # shapes as a tied head would have
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_replaces_the_checkpoint_and_a_crash_while_saving_keeps_the_last_good_one(tmp_path, monkeypatch):
    model, optimizer = tiny_training_state()
    path = str(tmp_path / "run")
    checkpoint.save(path, {"model": model}, optimizer, {"iteration": 1})
    checkpoint.save(path, {"model": model}, optimizer, {"iteration": 2})
    assert os.listdir(tmp_path) == ["run"]

    def cut_short(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # a crash while the files are written
        patch.setattr(checkpoint.torch, "save", cut_short)
        with pytest.raises(SystemExit, match="cannot write the checkpoint .*disk full.*the previous one is kept"):
            checkpoint.save(path, {"model": model}, optimizer, {"iteration": 3})
    assert json.load(open(os.path.join(path, "state.json"))) == {"iteration": 2}
    assert os.listdir(tmp_path) == ["run"]  # the half-written one is gone
    renames = []

    def crash_on_second_rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise OSError("killed")
        os.rename(src, dst)

    with monkeypatch.context() as patch:  # a crash between the two renames: the last good one is run.old
        patch.setattr(checkpoint.os, "replace", crash_on_second_rename)
        with pytest.raises(OSError):
            checkpoint.save(path, {"model": model}, optimizer, {"iteration": 3})
    assert sorted(os.listdir(tmp_path)) == ["run.old", "run.tmp"]
    state = {"script": "x.py", "args": {}, "iteration": 2, "num_rows": 1}
    json.dump(state, open(os.path.join(path + ".old", "state.json"), "w"))
    args = SimpleNamespace(resume=path)
    assert checkpoint.read_state(args, "x.py", 1, same=())["path"] == path + ".old"
    checkpoint.save(path, {"model": model}, optimizer, {"iteration": 4})
    assert os.listdir(tmp_path) == ["run"]
    assert json.load(open(os.path.join(path, "state.json"))) == {"iteration": 4}


def test_load_restores_weights_and_optimizer_and_runs_no_pickled_code(tmp_path):
    model, optimizer = tiny_training_state()
    path = str(tmp_path / "run")
    checkpoint.save(path, {"model": model}, optimizer, {})  # (no --fp16 scale)
    fresh, fresh_optimizer = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3)), None
    fresh[1].weight = nn.Parameter(fresh[0].weight.T.contiguous())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    checkpoint.load({"path": path, "run_name": "x", "step": 1}, {"model": fresh}, fresh_optimizer, None, "cpu")
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert str(fresh_optimizer.state_dict()) == str(optimizer.state_dict())

    torch.save({"state": {}, "param_groups": [], "payload": PickledCode()}, os.path.join(path, "optimizer.pt"))
    with pytest.raises(SystemExit, match=r"^error: --resume .*optimizer.pt holds more than tensors"):
        checkpoint.load({"path": path, "run_name": "x", "step": 1}, {"model": fresh}, fresh_optimizer, None, "cpu")
    assert not PICKLED_CODE_RAN


PICKLED_CODE_RAN = []


class PickledCode:
    def __reduce__(self):
        return (PICKLED_CODE_RAN.append, ("ran",))


def test_rng_state_round_trips_through_json():
    mixing = random.Random(3)

    def draws():
        return (random.random(), np.random.rand(), torch.rand(2).tolist(), torch.randperm(5).tolist(), mixing.random())

    draws()
    saved = json.loads(json.dumps(checkpoint.rng_state(mixing)))
    expected = draws()
    draws()
    checkpoint.set_rng_state(saved, mixing)
    assert draws() == expected


def test_a_signal_passed_on_by_a_launcher_is_the_same_stop_and_a_later_one_stops_at_once(monkeypatch):
    """torchrun passes a Ctrl-C on to every rank, which the terminal may have sent them too: a second signal
    right after the first is the same stop (it must not kill the process mid-checkpoint); a later one stops
    at once."""
    import time

    monkeypatch.setattr(stopping, "SAME_STOP_SECONDS", 0.5)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        received = stopping.stop_on_signals()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert received == ["SIGINT"]
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):  # (a later SIGTERM kills the process: a subprocess test below)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def run_error(script, args, cwd):
    """The one line a run stopped with (SystemExit at any point, before or during training)."""
    return resume_error(script, args, cwd)


def files_under(root):
    """Every file under root with its bytes: what a failed run must leave as it was."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.slow
def test_outputs_against_an_existing_file_fail_before_training_and_touch_nothing(assets, tmp_path, script):
    """--checkpoint-dir, --save-path, runs/ (TensorBoard and the generations) named where a file of the user's
    is: one line before training, and the file is as it was (no `.old`, no folder in its place)."""
    args = set_flags(sft_args(assets, "imdb") if script == "sft.py" else task_args(assets, "imdb", script),
                     "--save-every", 1)
    (tmp_path / "README.md").write_text("the user's notes")
    (tmp_path / "mine.tmp").mkdir()
    (tmp_path / "mine.tmp" / "draft.txt").write_text("keep me too")
    before = files_under(tmp_path)
    assert run_error(script, args + ["--checkpoint-dir", "README.md"], tmp_path) == \
        "error: --checkpoint-dir README.md is a file, not a folder; choose another path"
    assert run_error(script, args + ["--checkpoint-dir", "README.md/run"], tmp_path) == \
        "error: --checkpoint-dir README.md/run: README.md is a file, not a folder"
    assert run_error(script, args + ["--checkpoint-dir", "mine"], tmp_path).startswith(
        "error: --checkpoint-dir mine: mine.tmp is not a checkpoint, and a save would replace it")
    assert run_error(script, args + ["--save-model", "--save-path", "README.md"], tmp_path) == \
        "error: --save-path README.md is a file, not a folder"
    assert run_error(script, args + ["--save-model", "--save-path", "README.md/model"], tmp_path) == \
        "error: --save-path README.md/model: README.md is a file, not a folder"
    (tmp_path / "runs").write_text("not a folder")
    before = files_under(tmp_path)
    assert run_error(script, args, tmp_path).startswith("error: TensorBoard's folder runs/")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("fault", [errno.EACCES, errno.ENOSPC])
def test_a_folder_that_cannot_be_written_fails_before_training(assets, tmp_path, monkeypatch, fault):
    """No permission (simulated: the tests run as root) or a full disk where runs/, the checkpoint or the
    saved model go: one line naming the flag and the reason, before any model loads."""
    def no_file(*args, **kwargs):
        raise OSError(fault, os.strerror(fault))

    monkeypatch.setattr(checkpoint.tempfile, "TemporaryFile", no_file)
    args = set_flags(task_args(assets, "imdb"), "--save-every", 1)
    message = run_error("ppo.py", args, tmp_path)
    assert message.startswith("error: TensorBoard's folder runs/") and message.endswith(f"({os.strerror(fault)})")
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("script", ["ppo.py", "sft.py"])
@pytest.mark.slow
def test_a_full_disk_while_writing_stops_with_one_line_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch,
                                                                                      script):
    """ENOSPC (simulated) in the second checkpoint, in a generations file, in --save-model: one line each; the
    first checkpoint stays whole (and resumes), the half-written one is gone."""
    args = set_flags(sft_args(assets, "imdb", steps=2) if script == "sft.py" else task_args(assets, "imdb", script),
                     "--save-every", 1, "--eval-every", 0)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    saves = []
    torch_save = torch.save

    def second_save_fails(*a, **k):
        saves.append(1)
        if len(saves) == 2:
            raise full
        torch_save(*a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", second_save_fails)
    (tmp_path / "one").mkdir()
    message = run_error(script, args, tmp_path / "one")
    [folder] = checkpoint_folders(tmp_path / "one")
    assert message == (f"error: cannot write the checkpoint {os.path.relpath(folder, tmp_path / 'one')} (No space left "
                       f"on device); the previous one is kept in {os.path.relpath(folder, tmp_path / 'one')}")
    state = json.load(open(os.path.join(folder, "state.json")))
    assert state.get("iteration", state.get("step")) == 1 and not glob.glob(folder + ".tmp")
    monkeypatch.setattr(checkpoint.torch, "save", torch_save)
    run_script_in_process(script, args + ["--resume", folder], tmp_path / "one")  # it resumes

    (tmp_path / "two").mkdir()
    def full_disk_for_generations(path, *a, **k):
        if "generations" in str(path):
            raise full
        return open(path, *a, **k)

    monkeypatch.setattr(tasks, "open", full_disk_for_generations, raising=False)
    message = run_error(script, set_flags(args, "--eval-every", 1, "--save-every", 0), tmp_path / "two")
    assert message == f"error: cannot write {glob.glob('runs/*', root_dir=tmp_path / 'two')[0]}/generations/" \
        f"{'step_000000' if script == 'sft.py' else 'iteration_0000'}.jsonl: No space left on device", message
    monkeypatch.delattr(tasks, "open")

    (tmp_path / "three").mkdir()
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(full))
    message = run_error(script, set_flags(args, "--save-every", 0) + ["--save-model", "--save-path", "out"],
                        tmp_path / "three")
    assert message == f"error: cannot write the {'model' if script == 'sft.py' else 'policy'} to out: No space left " \
                      "on device; nothing was written there"
    assert not os.path.exists(tmp_path / "three" / "out.tmp")


@pytest.mark.parametrize("part", ["policy.safetensors", "critic.safetensors", "optimizer.pt", "state.json"])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
@pytest.mark.slow
def test_a_damaged_or_missing_part_of_a_checkpoint_fails_with_one_line_naming_it(assets, tmp_path, ppo_checkpoint,
                                                                                  part, damage):
    folder = tmp_path / "checkpoint"
    shutil.copytree(ppo_checkpoint, folder)
    if damage == "missing":
        os.remove(folder / part)
    else:
        data = (folder / part).read_bytes()
        (folder / part).write_bytes(data[: len(data) // 2])
    before = files_under(tmp_path)
    message = resume_error("ppo.py", set_flags(task_args(assets, "imdb"), "--eval-every", 0, "--resume", folder),
                           tmp_path)
    if part == "state.json" and damage == "missing":
        assert message == f"error: --resume {folder}: not a checkpoint folder (no state.json)"
    else:
        assert message.startswith(f"error: --resume {folder}: {part} is {'missing' if damage == 'missing' else 'damaged'}")
    assert {k: v for k, v in files_under(tmp_path).items() if not k.startswith("runs")} == before


def test_keep_checkpoints_keeps_the_newest_beside_the_checkpoint_and_drops_the_oldest(tmp_path):
    """--keep-checkpoints 3: the newest in ck, the two before it as ck.iteration_K (by their own iteration), the
    oldest removed; 1 (the default): ck alone, as a save always did."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for keep, folder in ((3, tmp_path / "three"), (1, tmp_path / "one")):
        folder.mkdir()
        for iteration in range(1, 5):
            checkpoint.save(str(folder / "ck"), {"policy": model}, optimizer, {"iteration": iteration}, keep=keep)
        kept = {name: json.load(open(folder / name / "state.json"))["iteration"] for name in os.listdir(folder)}
        assert kept == ({"ck": 4, "ck.iteration_000003": 3, "ck.iteration_000002": 2} if keep == 3 else {"ck": 4})
    checkpoint.save(str(tmp_path / "sft"), {"model": model}, optimizer, {"step": 7}, keep=2)
    checkpoint.save(str(tmp_path / "sft"), {"model": model}, optimizer, {"step": 8}, keep=2)
    assert os.path.isdir(tmp_path / "sft.step_000007") and checkpoint.kept_checkpoints(str(tmp_path / "sft")) == [
        str(tmp_path / "sft.step_000007")]


@pytest.mark.parametrize("script", ["ppo.py", "sft.py"])
@pytest.mark.slow
def test_a_kept_checkpoint_resumes_its_run(assets, tmp_path, capsys, script):
    """A run with --keep-checkpoints 2 keeps its last two; --resume of the earlier one continues from there and ends
    as the run did (the same weights)."""
    args = set_flags(four_step_args(assets, script), "--save-every", 1, "--checkpoint-dir", "ck",
                     "--keep-checkpoints", 2)
    whole = run_script_in_process(script, args, tmp_path)
    unit = "step" if script == "sft.py" else "iteration"
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("ck")) == ["ck", f"ck.{unit}_000003"]
    capsys.readouterr()
    resumed = run_script_in_process(script, set_flags(args, "--checkpoint-dir", "ck2") + [
        "--resume", f"ck.{unit}_000003"], tmp_path)
    assert f" at {unit} 3 from ck.{unit}_000003" in capsys.readouterr().out
    model = "model" if script == "sft.py" else "policy"
    for a, b in zip(whole[model].parameters(), resumed[model].parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_an_sft_checkpoint_of_the_old_format_resumes_exactly(assets, tmp_path, capsys):
    """sft.py's checkpoints before common/run.py held one random state (a dict, the only process's), where they now
    hold every rank's in a list: such a checkpoint still resumes, and the run ends as the whole run did."""
    args = set_flags(four_step_args(assets, "sft.py"), "--save-every", 1, "--checkpoint-dir", "ck",
                     "--keep-checkpoints", 2)
    whole = run_script_in_process("sft.py", args, tmp_path)
    with open(tmp_path / "ck.step_000003" / "state.json") as f:
        state = json.load(f)
    [state["rng"]] = state["rng"]  # the old format: the dict itself
    with open(tmp_path / "ck.step_000003" / "state.json", "w") as f:
        json.dump(state, f)
    resumed = run_script_in_process("sft.py", set_flags(args, "--checkpoint-dir", "ck2") + [
        "--resume", "ck.step_000003"], tmp_path)
    assert " at step 3 from ck.step_000003" in capsys.readouterr().out
    for a, b in zip(whole["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)


def test_the_loop_state_a_checkpoint_saves_is_the_one_resume_restores(tmp_path):
    """run.end_iteration saves what the loop hands it and run.resume restores the names it was given: a name given
    to one and not the other (a fork that adds a variable to one call) fails at once, not at the next resume; a
    checkpoint's own names are refused as loop state."""
    from types import SimpleNamespace

    from common.run import Run

    run = Run.__new__(Run)
    run.unit, run.checkpoint_dir, run.master = "iteration", None, True
    run.args = SimpleNamespace(keep_checkpoints=1)
    with pytest.raises(ValueError, match="rng"):
        run.resume({}, None, None, rng=1)
    run.resumed = None
    assert run.resume({}, None, None, kl_coef=0.1, prompt_order=[3, 1]) == (0.1, [3, 1])
    run.stop, run.first, run.total, run.device, run.iteration_start = [], 1, 3, torch.device("cpu"), 0.0
    with pytest.raises(ValueError, match="kl_coef, prompt_order"):
        run.end_iteration(1, kl_coef=0.1, prompt_order=[1], extra=2)
    run.end_iteration(1, kl_coef=0.1, prompt_order=[1])  # (the same names: no checkpoint is due, nothing happens)


@pytest.mark.slow
def test_a_run_resumed_from_a_kept_checkpoint_into_its_own_folder_goes_on(assets, tmp_path):
    """6 iterations with --keep-checkpoints 3, resumed from the oldest kept one (iteration 4) into the run's own
    --checkpoint-dir: a later save once renamed ck.old onto the existing ck.iteration_000005 (OSError: Directory not
    empty, a traceback). The kept checkpoints at or after a save's iteration belong to the future the run left: they
    go; the run ends as the uninterrupted one did."""
    args = set_flags(task_args(assets, "imdb", "ppo.py"), "--total-episodes", 24, "--eval-every", 0, "--save-every", 1,
                     "--checkpoint-dir", "ck", "--keep-checkpoints", 3)
    whole = run_script_in_process("ppo.py", args, tmp_path)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ck")) == [
        "ck", "ck.iteration_000004", "ck.iteration_000005"]
    resumed = run_script_in_process("ppo.py", args + ["--resume", "ck.iteration_000004"], tmp_path)
    kept = {name: json.load(open(tmp_path / name / "state.json"))["iteration"]
            for name in os.listdir(tmp_path) if name.startswith("ck")}
    assert kept == {"ck": 6, "ck.iteration_000005": 5, "ck.iteration_000004": 4}
    for a, b in zip(whole["policy"].parameters(), resumed["policy"].parameters()):
        assert torch.equal(a, b)


def test_a_save_cut_short_between_its_renames_loses_no_kept_checkpoint(tmp_path):
    """A crash after the new checkpoint took `ck` but before the previous one was named ck.iteration_K leaves it in
    ck.old: the next save keeps it (as ck.iteration_K) where it once deleted it."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    path = str(tmp_path / "ck")
    for iteration in (1, 2):
        checkpoint.save(path, {"policy": model}, optimizer, {"iteration": iteration}, keep=3)
    os.replace(path + ".iteration_000001", path + ".old")  # (where the crash left it)
    checkpoint.save(path, {"policy": model}, optimizer, {"iteration": 3}, keep=3)
    kept = {name: json.load(open(tmp_path / name / "state.json"))["iteration"] for name in os.listdir(tmp_path)}
    assert kept == {"ck": 3, "ck.iteration_000002": 2, "ck.iteration_000001": 1}


def test_a_saved_model_replaces_the_folder_whole(tmp_path):
    """--save-model onto a previous model's folder: the new folder replaces it whole (the old one's other files do
    not stay, and no crash can leave old and new files mixed in it)."""
    folder = tmp_path / "saved"
    folder.mkdir()
    for name in ("model.safetensors", "training_args.bin"):
        (folder / name).write_text("old")
    with checkpoint.writing("the policy to", str(folder)) as tmp:
        os.makedirs(tmp)
        (Path(tmp) / "model.safetensors").write_text("new")
    assert sorted(os.listdir(folder)) == ["model.safetensors"] and (folder / "model.safetensors").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_an_error_that_is_not_the_disks_is_raised_as_it_is(tmp_path):
    """Only what the OS refused (no space, a file too large, no permission) is reported as a failed write; another
    error while saving (a bug) is raised with its traceback, not dressed as a full disk."""
    class Broken(nn.Module):
        def named_parameters(self, *args, **kwargs):
            raise RuntimeError("a bug, not the disk")

        def parameters(self, *args, **kwargs):
            return iter([nn.Parameter(torch.zeros(1), requires_grad=False)])

    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="a bug, not the disk"):
        checkpoint.save(str(tmp_path / "ck"), {"policy": Broken()}, torch.optim.AdamW(model.parameters()),
                        {"iteration": 1})


@pytest.mark.slow
def test_a_second_sigterm_kills_the_process_as_sigterm(tmp_path):
    """The first SIGTERM asks for a clean stop; a second, later one stops at once, with SIGTERM's own status (143
    in a shell), where it once read as a Ctrl-C (130)."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        sys.path.insert(0, %r)
        from common import stopping
        stopping.SAME_STOP_SECONDS = 0.2
        stopping.stop_on_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    """ % ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr[-500:])


@pytest.mark.parametrize("failing", ["every", "first"])
@pytest.mark.slow
def test_a_failed_write_of_an_evaluations_generations_is_a_clean_stop(assets, tmp_path, monkeypatch, capsys, failing):
    """Rank 0 writes the evaluation's generations while the other ranks wait in a collective: a write that fails
    there (a full disk) is noted as a stop, so every rank ends the iteration, checkpoints and exits with one line,
    instead of rank 0 dying alone; also when only the first evaluation's write fails, before the loop starts."""
    calls = []

    def full(path, rows):
        calls.append(path)
        if failing == "every" or len(calls) == 1:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tasks, "write_jsonl", full)
    args = set_flags(task_args(assets, "imdb", "ppo.py"), "--save-every", 5, "--checkpoint-dir", "ck")
    with pytest.raises(SystemExit) as stopped:
        run_script_in_process("ppo.py", args, tmp_path)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "stopped by an error writing runs/" in err and "(No space left on device)" in err
    assert json.load(open(tmp_path / "ck" / "state.json"))["iteration"] == 1


def test_a_folder_beside_kept_checkpoints_of_another_run_is_refused(tmp_path):
    """A save renames onto ck.iteration_K and a resumed run drops its own later ones: kept checkpoints of another
    run beside --checkpoint-dir are refused at start, never overwritten or deleted."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    path = str(tmp_path / "ck")
    for iteration in (1, 2):
        checkpoint.save(path, {"policy": model}, optimizer, {"iteration": iteration, "run_name": "a"}, keep=2)
    shutil.rmtree(path)
    with pytest.raises(SystemExit, match=r"ck.iteration_000001 is a checkpoint of run a"):
        checkpoint.check_dir(path, "b")
    checkpoint.check_dir(path, "a")  # (its own: fine)
