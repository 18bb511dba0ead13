"""The GPU path, read against CUDA's semantics and tested here through its CPU analogues.

CPU autocast in bfloat16 follows the same casting rules as CUDA's (an nn.Linear under it computes in
bf16 whatever its input), so mixed precision is tested on the CPU; what depends on the GPU alone
(kernels chosen by shape, per-device random states, host-device waits) is tested by its structure:
the shapes a recompute runs with, the device whose random state is saved, the number of reads from
the device a rollout makes.
"""

import glob
import os
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import aggrevated
import d2lols
import ppo
from common import checkpoint, memory, text
from conftest import RL_MODULES, RL_SCRIPTS, Spy, module_name, run_script_in_process, set_flags, task_args

rl_modules = pytest.mark.parametrize("module", RL_MODULES, ids=module_name)


@rl_modules
def test_the_value_head_runs_in_float32_under_bf16_autocast(assets, module):
    """Under autocast an nn.Linear recasts its input to bf16, so `.float()` before the head did nothing: values (and
    GAE, and the value loss) had ~3 significant digits. The head runs outside autocast: its values are float32 and
    equal the float32 head's on the backbone's output."""
    torch.manual_seed(0)
    critic = module.Critic(assets["policy"]).eval()
    torch.nn.init.normal_(critic.value_head.weight, std=1.0)  # (zero at start: any head would give 0)
    torch.nn.init.normal_(critic.value_head.bias, std=1.0)
    input_ids = torch.randint(3, 300, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = critic(input_ids, attention_mask, 4)
        hidden = critic.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=module.position_ids(attention_mask)).last_hidden_state
    with torch.no_grad():
        expected = critic.value_head(hidden[:, -5:-1].float()).squeeze(-1)  # the head in float32, outside autocast
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)


def test_a_bf16_lora_run_saves_the_adapters_whole(assets, tmp_path):
    """--lora-r with --bf16: the frozen weights are bf16, the adapters fp32. Merged into bf16 weights, most of the
    adapters' small delta rounds away; merged in fp32 (and saved in fp32), the saved model's logits are the adapted
    policy's: its bf16 base weights plus its adapters, as the run's last checkpoint holds them."""
    args = set_flags(task_args(assets, "imdb", "ppo.py"), "--num-minibatches", 1, "--eval-every", 0,
                     "--learning-rate", 1e-3, "--save-every", 2) + [
        "--lora-r", "4", "--lora-alpha", "8", "--bf16", "--save-model", "--save-path", "final"]
    run_script_in_process("ppo.py", args, tmp_path)
    [folder] = glob.glob(str(tmp_path / "checkpoints" / "*"))
    flags = SimpleNamespace(lora_r=4, lora_alpha=8, lora_target_modules=("all-linear",))
    base = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.bfloat16).float().eval()
    adapted = memory.add_lora(AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.bfloat16).float(),
                              flags, "CAUSAL_LM").eval()
    checkpoint.load_weights(adapted, os.path.join(folder, "policy.safetensors"), "cpu")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert next(saved.parameters()).dtype == torch.float32
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        adapted_logits, saved_logits, base_logits = (m(input_ids=input_ids).logits for m in (adapted, saved, base))
    moved = (adapted_logits - base_logits).abs().max()
    assert moved > 1e-3  # the adapters learned something
    assert (saved_logits - adapted_logits).abs().max() < 1e-3 * moved  # and the saved model has all of it


@pytest.mark.parametrize("script", RL_SCRIPTS)
@pytest.mark.slow
def test_bf16_old_logprobs_are_recomputed_with_the_updates_shapes(assets, tmp_path, script):
    """Under --bf16 the rollout's log-probs come from a training-style forward pass; on a GPU a kernel, and so its
    rounding, is chosen by shape, so that pass runs on the update's micro-batch shapes: every forward pass of the
    policy, in scoring and in the update, takes --micro-batch-size rows (here 2, with 3 prompts a generate call),
    and the first ratio is 1 (on the CPU, whose rounding does not depend on the shape, exactly)."""
    passes = []

    class Shapes(Spy):
        def wrap(self, function):
            def recorded(model, input_ids, attention_mask, num_response_tokens):
                passes.append((model, torch.is_inference_mode_enabled(), input_ids.shape[0]))
                return function(model, input_ids, attention_mask, num_response_tokens)

            return recorded

    args = set_flags(task_args(assets, "imdb", script), "--micro-batch-size", 2, "--num-minibatches", 2,
                     "--rollout-batch-size", 3, "--eval-every", 0, "--total-episodes", 8, "--batch-size", 8) + ["--bf16"]
    result = run_script_in_process(script, args, tmp_path, {"response_logits": Shapes()})
    policy = [(inference, rows) for model, inference, rows in passes if model is result["policy"]]
    scoring = [rows for inference, rows in policy if inference]
    update = [rows for inference, rows in policy if not inference]
    assert scoring and update and set(scoring) == set(update) == {2}, policy
    assert result["args"].micro_batch_size == 2


def test_the_random_state_is_the_processs_own_devices(monkeypatch):
    """A checkpoint holds the CUDA random state of the process's own device only: resumed with fewer visible GPUs
    (or --cuda False on a GPU machine) nothing indexes a device that is not there, and a CPU run never touches CUDA
    (its state functions would initialise it). An old checkpoint (every visible device's state) gives this device
    its own."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched by a run on the CPU")

    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    state = checkpoint.rng_state(None, torch.device("cpu"))
    assert state["cuda"] is None
    old = dict(state, cuda=[[1] * 8, [2] * 8])  # saved on 2 visible GPUs
    checkpoint.set_rng_state(old, None, torch.device("cpu"))  # (on the CPU: nothing to restore)

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: calls.append(("get", device)) or
                        torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device=None: calls.append(
        ("set", new_state.tolist(), device)))
    device = torch.device("cuda:1")
    state = checkpoint.rng_state(None, device)
    assert calls == [("get", device)] and state["cuda"] == [7] * 8
    calls.clear()
    checkpoint.set_rng_state(state, None, device)
    checkpoint.set_rng_state(old, None, device)  # the old format: this device's entry of the list
    checkpoint.set_rng_state(old, None, torch.device("cuda:5"))  # a device the old run did not see: left alone
    assert calls == [("set", [7] * 8, device), ("set", [2] * 8, device)]


class HostReads:
    """Counts the reads from the device (item, int, float, bool, tolist, cpu...) outside `generate`, whose own
    stopping checks are transformers'."""

    NAMES = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count, self.paused = 0, False
        for name in self.NAMES:
            def counted(tensor, *args, _original=getattr(torch.Tensor, name), **kwargs):
                if not self.paused:
                    self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def uncounted(self, generate):
        def call(*args, **kwargs):
            self.paused = True
            try:
                return generate(*args, **kwargs)
            finally:
                self.paused = False

        return call


def rollout_reads(module, assets, monkeypatch, rows, horizon):
    """The reads from the device one rollout of `rows` prompts to `horizon` tokens makes (and the decoding of its
    text): the script's own rollout (PPO++'s with a roll-in on every other row; AggreVaTeD's with a guide that
    answers at once)."""
    tokenizer = assets["tokenizer"]
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    reads = HostReads(monkeypatch)
    policy.generate = reads.uncounted(policy.generate)
    args = SimpleNamespace(rollout_batch_size=3, temperature=1.0, max_new_tokens=horizon, beta=0.5)
    prompts = [tokenizer(f"the movie {i} was").input_ids for i in range(rows)]
    config = GenerationConfig(max_new_tokens=horizon, min_new_tokens=horizon, do_sample=True,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(0)
    reads.count = 0
    if module in (aggrevated, d2lols):
        guide = SimpleNamespace(write=lambda examples, prefixes, budgets: [([7] * b, False) for b in budgets])
        batch = [{"prompt_ids": p} for p in prompts]
        _, _, responses, *_ = module.guide_roll_out(policy, guide, tokenizer, batch, config, args, "cpu",
                                                    random.Random(0))
    elif module is ppo:
        _, _, responses, *_ = module.rollout(policy, tokenizer, prompts, config, args, "cpu")
    else:
        roll_ins = [[5, 6] if i % 2 else [] for i in range(rows)]
        _, _, responses, *_ = module.rollout(policy, tokenizer, prompts, config, args, "cpu", roll_ins)
    text.decode_continuations(tokenizer, prompts, responses)
    return reads.count


@rl_modules
def test_a_rollout_reads_from_the_device_a_fixed_number_of_times(assets, monkeypatch, module):
    """On CUDA every read of a tensor's value waits for the device: a per-token or per-row read (`int(t)` for each
    token while decoding, `int(mask[i].sum())` for each row while laying episodes out) costs thousands of waits an
    iteration. A rollout and its decoding read the batch a fixed number of times, whatever its rows and tokens."""
    counts = {(rows, horizon): rollout_reads(module, assets, monkeypatch, rows, horizon)
              for rows, horizon in [(4, 6), (8, 6), (4, 12)]}
    assert len(set(counts.values())) == 1, counts


def test_each_rank_takes_its_gpu_before_the_process_group(monkeypatch):
    """torchrun on GPUs: the rank's device is set before the process group, which NCCL then binds to it at once
    (device_id): set after, every rank's first NCCL call could start on GPU 0."""
    from common import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: calls.append(
        ("init_process_group", k.get("device_id"))))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert distributed.setup(True) == (1, 2, torch.device("cuda:1"))
    assert calls == [("set_device", torch.device("cuda:1")), ("init_process_group", torch.device("cuda:1"))]


def test_d2lols_forks_only_the_random_states_it_names(assets, tmp_path, monkeypatch):
    """fork_rng() with no devices forks every visible GPU's state (and warns past one): D2LOLS's forks, around its
    second critic, name theirs (the CPU's alone where the model is built on the host)."""
    seen, fork_rng = [], torch.random.fork_rng

    def recorded(devices=None, **kwargs):
        seen.append(devices)
        return fork_rng(devices=devices, **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", recorded)
    run_script_in_process("d2lols.py", set_flags(task_args(assets, "imdb", "d2lols.py"), "--eval-every", 0) + [
        "--lora-r", "4"], tmp_path)
    assert len(seen) >= 2 and all(devices is not None for devices in seen), seen
