"""The update does not depend on how a batch is split: for the same episodes and weights, one minibatch
in one micro-batch, in micro-batches of one episode, and over two processes gives the same weights and the
same logged statistics (each loss term is a mean over its own tokens in the whole minibatch)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_model

from conftest import RL_SCRIPTS, Spy, read_tensorboard, run_script_in_process, set_flags, task_args
from test_distributed import torchrun

# the helpers that write each script's episodes (replayed on two processes)
EPISODE_HELPERS = {"ppo.py": ["rollout"], "ppo_plus_plus.py": ["guide_roll_in", "rollout"],
                   "aggrevated.py": ["guide_roll_out"], "d2lols.py": ["guide_roll_out", "guide_roll_in", "rollout"]}
NOT_COMPARED = ("timing/", "charts/eps")


def split_args(assets, script):
    """4 iterations of 8 episodes that end at different steps (a policy that says EOS with p = 0.2), one
    minibatch, 2 epochs (the second at ratio != 1), and an optimizer whose step is linear in the gradient
    (AdamW with eps 10 >> |g|: lr * g / eps), so that any change of the gradient's size shows."""
    args = set_flags(task_args(assets, "imdb", script), "--model-name-or-path", assets["often_eos"],
                     "--total-episodes", 32, "--batch-size", 8, "--num-minibatches", 1, "--update-epochs", 2,
                     "--max-new-tokens", 6, "--min-new-tokens", 0, "--top-k", 0, "--eval-every", 4,
                     "--learning-rate", 0.3, "--adam-eps", 10.0, "--max-grad-norm", 0, "--seed", 3)
    if script != "ppo.py":
        args = set_flags(args, "--guide-model", assets["often_eos"], "--guide-top-k", 0, "--guide-top-p", 1.0,
                         "--guide-min-new-tokens", 0, "--beta", 0.5)
    if script == "d2lols.py":
        args = set_flags(args, "--tau", 2)  # two iterations of each phase
    return args


def logged(events):
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if not tag.startswith(NOT_COMPARED)}


def assert_same_run(a, b, what):
    assert a["logs"].keys() == b["logs"].keys()
    for tag in a["logs"]:
        assert a["logs"][tag] == pytest.approx(b["logs"][tag], rel=1e-4, abs=1e-5), (what, tag)
    for name in a["weights"]:
        for key in b["weights"][name]:  # (a saved model leaves out its tied weights)
            torch.testing.assert_close(a["weights"][name][key], b["weights"][name][key], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{what}: {name}.{key}: {m}")


@pytest.mark.parametrize("script, estimator", [(script, "gae") for script in RL_SCRIPTS] + [
    ("ppo.py", "rloo"), ("ppo_plus_plus.py", "rloo")])
@pytest.mark.slow
def test_the_update_is_the_same_however_the_batch_is_split(assets, tmp_path, script, estimator):
    """One process with the minibatch in one micro-batch, in micro-batches of one episode, and two processes
    (torchrun, gloo) each given its half of the same episodes (replayed; micro-batches of one, so DDP's gradient
    sync skips all but the last): the same weights and the same logged statistics. The two ranks also stay one
    model on disjoint shares of the batch, with the same prompt order, and rank 0 alone logs. rloo: 2 samples a
    prompt, each rank's half holds whole groups."""
    args = split_args(assets, script)
    if estimator == "rloo":
        args += ["--advantage-estimator", "rloo", "--samples-per-prompt", "2"]
    runs = {}
    for micro_batch_size in (8, 1):
        cwd = tmp_path / f"micro{micro_batch_size}"
        cwd.mkdir()
        spies = {name: Spy() for name in EPISODE_HELPERS[script]}
        namespace = run_script_in_process(script, set_flags(args, "--micro-batch-size", micro_batch_size), cwd, spies)
        runs[micro_batch_size] = dict(
            logs=logged(read_tensorboard(cwd)), spies=spies, prompt_order=namespace["prompt_order"],
            weights={name: {k: v.detach().clone() for k, v in model.state_dict().items()}
                     for name, model in namespace["trained_models"].items()})
    whole, single = runs[8], runs[1]

    # the episodes are the same, and their micro-batches hold different numbers of loss tokens
    episodes = {name: [call.result for call in spy.calls] for name, spy in whole["spies"].items()}
    if script == "d2lols.py":  # (its PPO++ phase's rollouts: those from guide_roll_in's states, not AggreVaTeD's roll-ins)
        roll_ins = [call.result for call in whole["spies"]["guide_roll_in"].calls]
        episodes["rollout"] = [c.result for c in whole["spies"]["rollout"].calls if any(c.roll_ins is r for r in roll_ins)]
    helper = "guide_roll_out" if script == "d2lols.py" else EPISODE_HELPERS[script][-1]
    policy_tokens = []
    for a, b in zip(whole["spies"][helper].calls, single["spies"][helper].calls, strict=True):
        for x, y in zip(a.result, b.result):
            if torch.is_tensor(x) and x.is_floating_point():  # (log-probs: the weights differ by rounding)
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(x, y) if torch.is_tensor(x) else x == y
        policy_tokens += a.result[5 if script == "ppo_plus_plus.py" else 3].sum(1).tolist()  # (the policy's mask)
    assert len(set(policy_tokens)) > 2, policy_tokens
    if script in ("aggrevated.py", "d2lols.py"):  # a micro-batch of one guide-only episode: no policy token
        assert 0 in policy_tokens and max(policy_tokens) > 0, policy_tokens
    assert_same_run(whole, single, "--micro-batch-size 1")

    # two processes, each with its half of the same episodes (replayed), micro-batches of one episode
    torch.save(episodes, tmp_path / "episodes.pt")
    cwd = tmp_path / "two"
    cwd.mkdir()
    result = torchrun(script, set_flags(args, "--micro-batch-size", 1), cwd,
                      env={"REPLAY_EPISODES": str(tmp_path / "episodes.pt")})
    assert result.returncode == 0, result.stderr[-3000:]
    # (the replayed episodes never ask the guide: its own counters are tested in test_distributed.py)
    guide_counters = ("guide/tokens_asked", "guide/tokens_returned")
    whole = dict(whole, logs={tag: v for tag, v in whole["logs"].items() if tag not in guide_counters})
    two = dict(logs={tag: v for tag, v in logged(read_tensorboard(cwd)).items() if tag not in guide_counters},
               weights={name: load_file(cwd / f"{name}_rank0.safetensors") for name in whole["weights"]})
    assert_same_run(whole, two, "2 processes")
    for name in whole["weights"]:  # one model on both ranks
        rank0, rank1 = (load_file(cwd / f"{name}_rank{r}.safetensors") for r in (0, 1))
        assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), name
    ranks = [json.load(open(cwd / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["prompt_order"] == ranks[1]["prompt_order"] == whole["prompt_order"]
    # each rank was handed its own half of each batch (D2LOLS: its rollouts are those of iterations 3 and 4)
    assert len(ranks[0]["rollout_prompts"]) == (2 if script == "d2lols.py" else 4)
    for rank0, rank1 in zip(ranks[0]["rollout_prompts"], ranks[1]["rollout_prompts"]):
        assert len(rank0) == len(rank1) == 4 and not {tuple(p) for p in rank0} & {tuple(p) for p in rank1}
        assert estimator == "gae" or all(rank[0::2] == rank[1::2] for rank in (rank0, rank1))  # (whole groups)
    assert all(result.stdout.count(f"iteration {i}/4 ") == 1 for i in range(1, 5))
    assert "episodes on 2 x cpu" in result.stdout
    assert two["logs"]["charts/episodes"] == [8, 16, 24, 32] and len(two["logs"]["eval/score"]) == 2


def test_sft_steps_the_same_however_the_batch_is_split(assets, tmp_path):
    """sft.py: targets of different lengths (CommonGen references); one step with micro-batches of 1 moves the
    weights as the whole batch does (the loss is a mean over the batch's target tokens)."""
    from conftest import sft_args

    weights = {}
    for micro_batch_size in (4, 1):
        args = set_flags(sft_args(assets, "commongen", steps=1), "--micro-batch-size", micro_batch_size,
                         "--batch-size", 4, "--eval-every", 0, "--learning-rate", 1.0, "--adam-eps", 10.0,
                         "--max-grad-norm", 0, "--max-target-length", 24)
        (tmp_path / str(micro_batch_size)).mkdir()
        namespace = run_script_in_process("sft.py", args, tmp_path / str(micro_batch_size))
        assert len({len(target) for _, target in namespace["train_pairs"]}) > 1
        weights[micro_batch_size] = {k: v.clone() for k, v in namespace["model"].state_dict().items()}
    for key in weights[4]:
        torch.testing.assert_close(weights[1][key], weights[4][key], rtol=1e-4, atol=1e-6)
