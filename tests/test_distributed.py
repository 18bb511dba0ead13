"""Several processes (torchrun, DDP over gloo on the CPU): the ranks stay one model, and the batch
statistics are the whole batch's."""

import glob
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import d2lols
import ppo_plus_plus
from common import distributed
from conftest import ROOT, RL_MODULES, read_tensorboard, set_flags, task_args


def torchrun(script, args, cwd, env=None, worker=os.path.join(ROOT, "tests", "ddp_worker.py"), options=()):
    """2 processes on this machine (gloo): `worker` runs `script args` in each (tests/ddp_worker.py)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *options, worker,
               *([script] if script else []), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow  # two real processes (torchrun)
def test_two_processes_train_one_set_of_lora_adapters(assets, tmp_path):
    """--lora-r under DDP: only the adapters and the value head are DDP's parameters; both ranks end with
    the same adapters, which moved (B starts at 0)."""
    args = set_flags(task_args(assets, "imdb", "ppo_plus_plus.py"), "--total-episodes", 16, "--batch-size", 8,
                     "--eval-every", 0, "--learning-rate", 1e-2, "--lora-r", 4)
    result = torchrun("ppo_plus_plus.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ["policy", "critic"]:
        rank0, rank1 = (load_file(tmp_path / f"{name}_rank{r}.safetensors") for r in (0, 1))
        assert any("lora_B" in key and rank0[key].abs().sum() > 0 for key in rank0)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (name, key)

WHITENING_WORKER = '''
import json, os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import aggrevated, d2lols, ppo, ppo_plus_plus
dist.init_process_group("gloo")
rank = dist.get_rank()
advantages, mask, mixed = (torch.tensor(x) for x in json.load(open("batch.json"))[rank])
# PPO++ and D2LOLS: the mixed episodes and the policy's own apart
out = {{m.__name__: {{how: (m.normalize_advantages(advantages, mask, how, mixed) if m in (ppo_plus_plus, d2lols) else
                          m.normalize_advantages(advantages, mask, how)).tolist() for how in ("whiten", "scale")}}
       for m in (ppo, ppo_plus_plus, aggrevated, d2lols)}}
json.dump(out, open(f"whitened{{rank}}.json", "w"))
dist.destroy_process_group()
'''


GUIDE_STATS_WORKER = '''
import json, sys
sys.path.insert(0, {root!r})
from types import SimpleNamespace
import torch.distributed as dist
from common.guide import with_stats
dist.init_process_group("gloo")
rank = dist.get_rank()
# rank 0 asks for 3 + 4 tokens and gets 3 and 1 (+ EOS); rank 1 asks for 5 and gets 5; 2 and 1 requests
rows = [[([7, 7, 7], False), ([7, 2], True)], [([7] * 5, False)]][rank]
transport = iter([{{"guide/requests": 2 - rank, "guide/retries": rank, "timing/guide_latency_s": 0.5 + rank}},
                  {{"guide/requests": 0, "guide/retries": 0, "timing/guide_latency_s": 0.0}}])
guide = with_stats(SimpleNamespace(write=lambda examples, prefixes, budgets: rows, transport_stats=lambda: next(transport)))
guide.write(None, None, [[3, 4], [5]][rank])
json.dump([guide.stats(), guide.stats()], open(f"stats{{rank}}.json", "w"))
dist.destroy_process_group()
'''


@pytest.mark.slow  # two real processes (torchrun)
def test_the_guides_counters_are_the_whole_batchs(tmp_path):
    """guide.stats() on two ranks: tokens asked and returned, requests and retries summed over the ranks (each
    rank asks the guide for its share of the batch), then zero; latency stays the rank's own."""
    (tmp_path / "worker.py").write_text(GUIDE_STATS_WORKER.format(root=ROOT))
    result = torchrun(None, [], tmp_path, worker="worker.py")
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        first, second = json.load(open(tmp_path / f"stats{rank}.json"))
        assert {k: v for k, v in first.items() if k != "timing/guide_s"} == {
            "guide/tokens_asked": 12, "guide/tokens_returned": 9, "guide/requests": 3, "guide/retries": 1,
            "timing/guide_latency_s": 0.5 + rank}
        assert second["guide/tokens_asked"] == second["guide/requests"] == 0


@pytest.mark.slow  # two real processes (torchrun)
@pytest.mark.parametrize("script", ["ppo_plus_plus.py"])
def test_two_processes_stopped_either_way_save_before_leaving_and_resume_to_what_an_unstopped_run_logs(
        assets, tmp_path, script):
    """SIGINT in iteration 1 reaches rank 0 alone (a signal to one process), or torchrun, which passes it on to
    every rank (Ctrl-C in its terminal). Either way both ranks end the iteration, rank 0 writes the checkpoint
    with both ranks' random streams (slowed down here by 3 s), and no rank exits before it is complete; the
    printed command is torchrun's and, run, continues the run: TensorBoard and the weights are then those of a
    run that never stopped."""
    from test_checkpoints import four_step_args, logged

    args = four_step_args(assets, script)
    whole = tmp_path / "whole"
    whole.mkdir()
    assert torchrun(script, args, whole).returncode == 0
    for way in ("SIGINT_RANK0_IN_ITERATION", "SIGINT_LAUNCHER_IN_ITERATION"):
        stopped = tmp_path / way
        stopped.mkdir()
        result = torchrun(script, args, stopped, env={way: "1", "SLOW_SAVE": "3"})
        assert result.returncode != 0 and "stopped by SIGINT after iteration 1/4; checkpoint: " in result.stderr, way
        [folder] = glob.glob(str(stopped / "checkpoints" / "*"))
        assert len(json.load(open(os.path.join(folder, "state.json")))["rng"]) == 2
        saved, *exits = (float((stopped / name).read_text()) for name in ("saved.txt", "exit_rank0.txt",
                                                                          "exit_rank1.txt"))
        assert min(exits) >= saved, f"{way}: a rank left before the checkpoint was complete"
        [line] = [line for line in result.stderr.splitlines() if line.startswith("resume with: ")]
        command = shlex.split(line.removeprefix("resume with: "))
        assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"] and command[-2:] == [
            "--resume", folder.removeprefix(str(stopped) + os.sep)], command
        resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", *command[1:]], cwd=stopped,
                                 capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert logged(read_tensorboard(stopped)) == logged(read_tensorboard(whole)), way
        for name in ("policy", "critic"):
            a, b = (load_file(cwd / f"{name}_rank0.safetensors") for cwd in (whole, stopped))
            assert all(torch.equal(a[key], b[key]) for key in a), way


@pytest.mark.slow  # two real processes (torchrun)
def test_whitening_over_two_ranks_is_whitening_over_their_union(tmp_path):
    """Each rank holds half of the batch, with different numbers of masked tokens (and, in PPO++ and D2LOLS, of
    mixed episodes: rank 0 holds one, rank 1 two): the advantages each script's normalize_advantages returns on
    the two ranks are the one-process numbers on the union."""
    torch.manual_seed(0)
    advantages = torch.randn(4, 5) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float)
    mixed = torch.tensor([1.0, 0.0, 1.0, 1.0])
    (tmp_path / "batch.json").write_text(json.dumps([[advantages[:2].tolist(), mask[:2].tolist(), mixed[:2].tolist()],
                                                     [advantages[2:].tolist(), mask[2:].tolist(), mixed[2:].tolist()]]))
    (tmp_path / "worker.py").write_text(WHITENING_WORKER.format(root=ROOT))
    result = torchrun(None, [], tmp_path, worker="worker.py")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"whitened{r}.json")) for r in (0, 1)]
    for module in RL_MODULES:
        for how in ("whiten", "scale"):
            grouped = module in (ppo_plus_plus, d2lols)
            normalize = (lambda a, m, s: module.normalize_advantages(a, m, how, mixed[s])) if grouped else (
                lambda a, m, s: module.normalize_advantages(a, m, how))
            expected = normalize(advantages, mask, slice(None))
            got = torch.tensor(ranks[0][module.__name__][how] + ranks[1][module.__name__][how])
            torch.testing.assert_close(got, expected)
            assert not torch.allclose(got[:2], normalize(advantages[:2], mask[:2], slice(0, 2)))


def test_one_process_helpers_are_the_identity():
    x, mask = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 0.0])
    assert distributed.mean(x).item() == x.mean().item()
    assert distributed.masked_mean(x, mask).item() == 1.5
    assert distributed.broadcast([3, 1, 2]) == [3, 1, 2] and distributed.gather("a") == ["a"]


def test_the_process_group_waits_long_for_rank_0s_evaluation_and_saves(monkeypatch):
    """Rank 0 alone evaluates and writes checkpoints while the others wait in a collective: the group's
    timeout is hours, not PyTorch's default minutes."""
    seen = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert distributed.setup(use_cuda=False)[:2] == (1, 2)
    assert seen["timeout"].total_seconds() >= 3 * 3600
    distributed.setup(use_cuda=False, timeout_minutes=15)  # --process-group-timeout
    assert seen["timeout"].total_seconds() == 15 * 60


def test_the_resume_command_names_torchrun_and_its_process_count(monkeypatch):
    """Under torchrun the printed command is a torchrun command (its own options where the parent process shows
    them, as in the 2-process test above; else the process count, and the node count when there are several)."""
    from common import stopping

    monkeypatch.setattr(sys, "argv", ["ppo.py", "--task", "imdb"])
    assert "resume with: python ppo.py --task imdb --resume ck" in stopping.stopped_message(["SIGINT"], "x", "ck")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(os, "getppid", os.getpid)  # a parent that is not torchrun: the fallback
    assert ("resume with: torchrun --nnodes 2 --nproc_per_node 2 ppo.py --task imdb --resume ck"
            in stopping.stopped_message(["SIGINT"], "x", "ck"))


@pytest.mark.slow  # two real processes (torchrun)
def test_a_guide_that_fails_on_one_rank_stops_every_rank_at_the_last_completed_iteration(assets, tmp_path):
    """2 processes, rank 1's guide fails for good in iteration 1 (rank 0's works): every rank agrees to stop (none
    waits forever in a collective), the checkpoint of the last completed iteration (0) is written with both ranks'
    random state, rank 0 prints rank 1's error in one line, and the exit status is non-zero."""
    args = set_flags(task_args(assets, "imdb", "ppo_plus_plus.py"), "--batch-size", 8, "--total-episodes", 16,
                     "--save-every", 1, "--eval-every", 0, "--beta", 1)
    result = torchrun("ppo_plus_plus.py", args, tmp_path, env={"GUIDE_FAILS_ON_RANK": "1"})
    assert result.returncode != 0
    assert "error: the guide server X failed 6 times\nstopped by that error after iteration 0/2; checkpoint: " in \
        result.stderr, result.stderr[-3000:]
    [folder] = glob.glob(str(tmp_path / "checkpoints" / "*"))
    state = json.load(open(os.path.join(folder, "state.json")))
    assert state["iteration"] == 0 and len(state["rng"]) == 2


@pytest.mark.slow  # two real processes (torchrun)
@pytest.mark.parametrize("script", [m.__name__ + ".py" for m in RL_MODULES])
def test_a_nan_loss_on_one_rank_under_fp16_stops_every_rank_alike(assets, tmp_path, script):
    """--fp16, 2 processes, rank 1's first loss is nan and rank 0's finite: the gradients (averaged) are nan on both.
    Decided from its own loss, rank 0 took it for an fp16 overflow and skipped the step while rank 1 stopped, so
    rank 0 went on into a collective rank 1 never joined. Every rank decides from all ranks' losses: both stop
    with the same line, before the optimizer step."""
    args = set_flags(task_args(assets, "imdb", script), "--batch-size", 8, "--total-episodes", 16, "--eval-every", 0)
    result = torchrun(script, args + ["--fp16"], tmp_path, env={"NAN_LOSS_ON_RANK": "1"})
    assert result.returncode != 0
    line = "error: iteration 1: the loss is not finite (nan or inf); stopped before the optimizer step"
    assert result.stderr.count(line) == 2, result.stderr[-3000:]



@pytest.mark.parametrize("options, env, seconds, warning", [
    ([], {}, 20, None),
    ([], {}, 45, "torchrun kills the workers 30 s after passing it on: start torchrun with --shutdown-timeout 90"),
    (["--shutdown-timeout", "900"], {}, 45, None),
    (["--shutdown_timeout=10"], {}, 20, "kills the workers 10 s after passing it on: start torchrun with "
                                        "--shutdown-timeout 40"),
    ([], {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}, 45, None)])
def test_a_torchrun_that_would_kill_a_stopping_run_before_it_saves_is_named(monkeypatch, capsys, options, env,
                                                                           seconds, warning):
    """After the first iteration (`seconds`), one line when torchrun's shutdown timeout (its flag, else its
    environment variable, else 30 s), read from the real parent process's command line, is shorter than an
    iteration and its save: a Ctrl-C on torchrun would then kill the workers before they checkpoint."""
    from common import stopping

    stopping.check_stop_time(1000)  # outside torchrun: nothing to say
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sys, "argv", ["ppo.py", "--task", "imdb"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/usr/bin/torchrun", *options,
                                 "--nproc_per_node", "2", "ppo.py", "--task", "imdb"])
    try:
        while b"torchrun" not in open(f"/proc/{launcher.pid}/cmdline", "rb").read():  # (until it has started)
            time.sleep(0.01)
        monkeypatch.setattr(os, "getppid", lambda: launcher.pid)
        stopping.check_stop_time(seconds)
    finally:
        launcher.kill()
        launcher.wait()
    out = capsys.readouterr().out
    assert (warning in out) if warning else out == "", out


@pytest.mark.slow  # two real processes (torchrun)
def test_a_rank_killed_mid_run_under_torchrun_max_restarts_ends_as_an_uninterrupted_run(assets, tmp_path):
    """2 processes under torchrun --max-restarts 1 with --resume auto: rank 1 is SIGKILLed in iteration 3 (an OOM
    kill), torchrun stops rank 0 and relaunches the same command, which continues from iteration 2's checkpoint: the
    final weights and every logged scalar are those of a run never interrupted."""
    from test_checkpoints import logged

    args = set_flags(task_args(assets, "imdb", "ppo.py"), "--batch-size", 8, "--total-episodes", 32, "--eval-every", 0,
                     "--save-every", 1) + ["--resume", "auto", "--checkpoint-dir", "ck"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    assert torchrun("ppo.py", args, whole).returncode == 0
    result = torchrun("ppo.py", args, killed, env={"SIGKILL_RANK1_IN_ITERATION": "3"}, options=["--max-restarts", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed " in result.stdout and " at iteration 2 from ck" in result.stdout, result.stdout[-2000:]
    assert logged(read_tensorboard(killed)) == logged(read_tensorboard(whole))
    for name in ("policy", "critic"):
        assert load_file(whole / f"{name}_rank0.safetensors").keys() == load_file(killed / f"{name}_rank0.safetensors").keys()
        for key, value in load_file(whole / f"{name}_rank0.safetensors").items():
            assert torch.equal(value, load_file(killed / f"{name}_rank0.safetensors")[key]), key
