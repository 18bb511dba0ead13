"""LoRA (--lora-r): the adapters train on frozen weights, the frozen weights are pi_ref (one copy, not
two), checkpoints hold the adapters, and --save-model writes the merged model as a plain checkpoint."""

import ast
import glob
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common import checkpoint, memory
from conftest import RL_SCRIPTS, ROOT, read_tensorboard, reward_model_of, run_script_in_process, set_flags, task_args
from test_checkpoints import checkpoint_folders, four_step_args, logged

LORA = ["--lora-r", "4", "--lora-alpha", "8"]


def lora_args(assets, script):
    """2 iterations of one minibatch, a learning rate at which the adapters visibly move (D2LOLS: its first phase
    trains only the policy's roll-in tokens, so every episode is mixed and the rate is higher)."""
    args = set_flags(task_args(assets, "imdb", script), "--num-minibatches", 1, "--eval-every", 0,
                     "--learning-rate", 1e-2) + LORA
    return set_flags(args, "--beta", 1, "--learning-rate", 3e-2) if script == "d2lols.py" else args


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


@pytest.mark.parametrize("script", RL_SCRIPTS)
def test_lora_trains_adapters_and_pi_ref_is_the_policys_frozen_weights(assets, tmp_path, script):
    """Only adapters and value heads train (and only they are in the optimizer); pi_ref shares the policy's
    weights and is exactly the starting model, so the KL starts at 0 and then grows as the adapters move;
    every update starts at ratio 1."""
    namespace = run_script_in_process(script, lora_args(assets, script), tmp_path)
    policy, ref_policy = namespace["policy"], namespace["ref_policy"]
    critics = [namespace["critic"]] + ([namespace["guide_critic"]] if script == "d2lols.py" else [])
    trained = [(name, p) for model in [policy, *critics] for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name or name.startswith("value_head.") for name, _ in trained)
    assert sum(len(g["params"]) for g in namespace["optimizer"].param_groups) == len(trained)
    # pi_ref: no copy of its own, the policy's tensors with the adapters off
    assert {p.data_ptr() for p in ref_policy.parameters()} <= {p.data_ptr() for p in policy.parameters()}
    start = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    assert torch.allclose(logits(ref_policy, input_ids), logits(start, input_ids), atol=1e-6)
    assert not torch.allclose(logits(policy, input_ids), logits(start, input_ids), atol=1e-3)  # the adapters moved
    events = read_tensorboard(tmp_path)
    kl = [e.value for e in events.Scalars("objective/kl")]
    assert abs(kl[0]) < 1e-4 and abs(kl[1]) > 1e-3
    assert all(e.value == pytest.approx(1, abs=1e-6) for e in events.Scalars("val/ratio"))


def test_lora_checkpoints_hold_the_adapters_and_save_model_writes_the_merged_model(assets, tmp_path):
    """The checkpoint holds the trainable tensors alone; loaded into a fresh adapted model they give the
    logits of the --save-model folder, a plain model (no adapters, no peft needed to read it)."""
    args = set_flags(lora_args(assets, "ppo.py"), "--save-every", 2) + ["--save-model", "--save-path", "final"]
    run_script_in_process("ppo.py", args, tmp_path)
    [folder] = checkpoint_folders(tmp_path)
    saved = load_file(os.path.join(folder, "policy.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    assert all("lora_" in name or name.startswith("value_head.") for name in load_file(os.path.join(folder, "critic.safetensors")))

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    flags = SimpleNamespace(lora_r=4, lora_alpha=8, lora_target_modules=("all-linear",))
    adapted = memory.add_lora(AutoModelForCausalLM.from_pretrained(assets["policy"]), flags, "CAUSAL_LM").eval()
    checkpoint.load_weights(adapted, os.path.join(folder, "policy.safetensors"), "cpu")
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    assert torch.allclose(logits(adapted, input_ids), logits(merged, input_ids), atol=1e-5)


@pytest.mark.slow
def test_a_lora_run_resumes_exactly_and_a_checkpoint_without_lora_does_not_fit(assets, tmp_path):
    """Stopped by SIGINT in iteration 1 and resumed: the same logs and adapters as an unstopped run. The
    checkpoint resumed without --lora-r fails with one line."""
    from test_checkpoints import StopIn

    args = four_step_args(assets, "ppo.py") + LORA
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    uninterrupted = run_script_in_process("ppo.py", args, whole)
    with pytest.raises(SystemExit):
        run_script_in_process("ppo.py", args, stopped, {"kl_penalized_rewards": StopIn(1, 1, "signal")})
    [folder] = checkpoint_folders(stopped)
    relative = os.path.relpath(folder, stopped)
    without_lora = args[: -len(LORA)]
    with pytest.raises(SystemExit) as error:
        run_script_in_process("ppo.py", without_lora + ["--resume", relative], stopped)
    assert str(error.value.code).startswith(f"error: --resume {relative}: its policy does not fit this run's model")
    resumed = run_script_in_process("ppo.py", args + ["--resume", relative], stopped)
    assert logged(read_tensorboard(stopped)) == logged(read_tensorboard(whole))
    for a, b in zip(uninterrupted["policy"].parameters(), resumed["policy"].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("script", ["ppo.py", "d2lols.py"])
@pytest.mark.slow
def test_lora_with_bf16_and_gradient_checkpointing(assets, tmp_path, script):
    """--bf16 with LoRA: the frozen weights (policy's, critic's, reward model's) in bfloat16, adapters and
    value heads in fp32; with --gradient-checkpointing the recomputed layers still train the adapters.
    The update starts at ratio 1 and the adapters move."""
    args = lora_args(assets, script) + ["--bf16", "--gradient-checkpointing"]
    namespace = run_script_in_process(script, args, tmp_path)
    models = [namespace["policy"], namespace["critic"]]
    for model in models:
        for name, p in model.named_parameters():
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert all(p.dtype == torch.bfloat16 for p in reward_model_of(namespace).parameters())
    moved = [p for name, p in namespace["policy"].named_parameters() if "lora_B" in name]
    assert moved and any(p.abs().sum() > 0 for p in moved)  # B starts at 0
    events = read_tensorboard(tmp_path)
    assert all(e.value == pytest.approx(1, abs=1e-6) for e in events.Scalars("val/ratio"))


def test_peft_is_imported_only_by_the_lora_helper():
    """Without --lora-r nothing imports peft: no script or shared module imports it at the top."""
    files = [os.path.join(ROOT, f) for f in [*RL_SCRIPTS, "sft.py"]] + glob.glob(os.path.join(ROOT, "common", "*.py"))
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top_level for alias in node.names] + [
            node.module for node in top_level if isinstance(node, ast.ImportFrom)]
        assert not any(name and name.split(".")[0] == "peft" for name in names), path
    with open(os.path.join(ROOT, "common", "memory.py")) as f:
        assert "import peft" in f.read()


@pytest.mark.parametrize("script", RL_SCRIPTS)
@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "-1"], "error: --lora-r"),
    (["--lora-r", "4", "--lora-alpha", "0"], "error: --lora-alpha"),
    (["--lora-r", "4", "--lora-target-modules", "no_such_layer"], "error: --lora-target-modules no_such_layer: "),
])
def test_bad_lora_flags_fail_with_one_line(assets, tmp_path, script, flags, message):
    with pytest.raises(SystemExit) as error:
        run_script_in_process(script, task_args(assets, "imdb", script) + flags, tmp_path)
    assert str(error.value.code).startswith(message) and "\n" not in str(error.value.code)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_adapters_fit_the_layers_without_a_warning(assets, architecture):
    """GPT-2 keeps its weights transposed (Conv1D), Llama in nn.Linear: add_lora tells peft which, so a run on
    either starts without peft's "fan_in_fan_out is set to ..." correction, and the adapters start at zero."""
    import warnings

    from transformers import LlamaConfig

    if architecture == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(assets["policy"])
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=2))
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    start = logits(model.eval(), input_ids)
    flags = SimpleNamespace(lora_r=4, lora_alpha=8, lora_target_modules=("all-linear",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = memory.add_lora(model, flags, "CAUSAL_LM").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)], [str(w.message) for w in caught]
    assert any("lora_" in name for name, _ in adapted.named_parameters())
    torch.testing.assert_close(logits(adapted, input_ids), start)
