"""Several processes (torchrun, DDP over gloo on the CPU): the ranks stay one model, and the batch
statistics are the whole batch's."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from common import distributed
from conftest import ROOT, RL_MODULES, RL_SCRIPTS, read_tensorboard, set_flags, task_args


def torchrun(script, args, cwd, env=None, worker=os.path.join(ROOT, "tests", "ddp_worker.py")):
    """2 processes on this machine (gloo): `worker` runs `script args` in each (tests/ddp_worker.py)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
               *([script] if script else []), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("script", RL_SCRIPTS)
def test_two_processes_train_one_model(assets, tmp_path, script):
    """5 iterations on 2 ranks (each samples 4 of the batch's 8 episodes; minibatches of 2 in 2 micro-batches,
    so the gradient sync skips the first; the 32 prompts run out in iteration 5): both ranks end with the
    same weights, which moved, and the same prompt order; their shares of a batch are disjoint; rank 0
    alone logs, once per iteration, with the global episode count."""
    args = set_flags(task_args(assets, "imdb", script), "--total-episodes", 40, "--batch-size", 8,
                     "--micro-batch-size", 1, "--eval-every", 5, "--learning-rate", 1e-3)
    if script == "d2lols.py":
        args = set_flags(args, "--tau", 2)
    result = torchrun(script, args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["prompt_order"] == ranks[1]["prompt_order"] and len(ranks[0]["prompt_order"]) == 24
    for rank0, rank1 in zip(ranks[0]["rollout_prompts"], ranks[1]["rollout_prompts"]):
        assert len(rank0) == len(rank1) == 4 and not {tuple(p) for p in rank0} & {tuple(p) for p in rank1}
    for name in ["policy", "critic"] + (["guide_critic"] if script == "d2lols.py" else []):
        rank0, rank1 = (load_file(tmp_path / f"{name}_rank{r}.safetensors") for r in (0, 1))
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (name, key)
    start = load_file(os.path.join(assets["policy"], "model.safetensors"))
    assert any(not torch.equal(start[k], v) for k, v in load_file(tmp_path / "policy_rank0.safetensors").items()
               if k in start)
    assert all(result.stdout.count(f"iteration {i}/5 ") == 1 for i in range(1, 6))
    assert "episodes on 2 x cpu" in result.stdout
    events = read_tensorboard(tmp_path)
    assert [e.value for e in events.Scalars("charts/episodes")] == [8, 16, 24, 32, 40]
    assert len(events.Scalars("eval/score")) == 2



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
advantages, mask = (torch.tensor(x) for x in json.load(open("batch.json"))[rank])
out = {{m.__name__: {{how: m.normalize_advantages(advantages, mask, how).tolist() for how in ("whiten", "scale")}}
       for m in (ppo, ppo_plus_plus, aggrevated, d2lols)}}
json.dump(out, open(f"whitened{{rank}}.json", "w"))
dist.destroy_process_group()
'''


@pytest.mark.parametrize("script", ["ppo_plus_plus.py"])
def test_two_processes_stopped_on_one_rank_and_resumed_log_what_an_unstopped_run_logs(assets, tmp_path, script):
    """SIGINT reaches rank 0 alone in iteration 1: both ranks end the iteration, rank 0 writes the checkpoint
    with both ranks' random streams, both exit; resumed on 2 processes, TensorBoard and the weights are
    those of a run that never stopped."""
    from test_checkpoints import four_step_args, logged

    args = four_step_args(assets, script)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    assert torchrun(script, args, whole).returncode == 0
    result = torchrun(script, args, stopped, env={"SIGINT_RANK0_IN_ITERATION": "1"})
    assert result.returncode != 0 and "stopped by SIGINT after iteration 1/4; checkpoint: " in result.stderr
    [folder] = glob.glob(str(stopped / "checkpoints" / "*"))
    assert len(json.load(open(os.path.join(folder, "state.json")))["rng"]) == 2
    result = torchrun(script, args + ["--resume", folder], stopped)
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged(read_tensorboard(stopped)) == logged(read_tensorboard(whole))
    for name in ("policy", "critic"):
        a, b = (load_file(cwd / f"{name}_rank0.safetensors") for cwd in (whole, stopped))
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_whitening_over_two_ranks_is_whitening_over_their_union(tmp_path):
    """Each rank holds half of the batch, with different numbers of masked tokens: the advantages each
    script's normalize_advantages returns on the two ranks are the one-process numbers on the union."""
    torch.manual_seed(0)
    advantages = torch.randn(4, 5) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float)
    (tmp_path / "batch.json").write_text(json.dumps([[advantages[:2].tolist(), mask[:2].tolist()],
                                                     [advantages[2:].tolist(), mask[2:].tolist()]]))
    (tmp_path / "worker.py").write_text(WHITENING_WORKER.format(root=ROOT))
    result = torchrun(None, [], tmp_path, worker="worker.py")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"whitened{r}.json")) for r in (0, 1)]
    for module in RL_MODULES:
        for how in ("whiten", "scale"):
            expected = module.normalize_advantages(advantages, mask, how)
            got = torch.tensor(ranks[0][module.__name__][how] + ranks[1][module.__name__][how])
            torch.testing.assert_close(got, expected)
            assert not torch.allclose(got[:2], module.normalize_advantages(advantages[:2], mask[:2], how))


def test_one_process_helpers_are_the_identity():
    x, mask = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 0.0])
    assert distributed.mean(x).item() == x.mean().item()
    assert distributed.masked_mean(x, mask).item() == 1.5
    assert distributed.broadcast([3, 1, 2]) == [3, 1, 2] and distributed.gather("a") == ["a"]
