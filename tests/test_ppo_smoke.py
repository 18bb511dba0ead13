"""ppo.py end to end on the tiny assets (a subprocess, as a user runs it), and its bad-input errors."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import RL_SCRIPTS, read_tensorboard, run_script, run_script_in_process, task_args, write_jsonl

DOCUMENTED_TAGS = [
    "objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward",
    "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
    "val/ratio", "val/explained_variance", "charts/episodes", "charts/eps", "charts/lr", "eval/score",
]
EVAL_TAGS = {
    "imdb": ["eval/distinct_1", "eval/distinct_2", "eval/perplexity"],
    "commongen": ["eval/rouge_1", "eval/rouge_2", "eval/rouge_L", "eval/bleu_4", "eval/cider_d"],
    "tldr": ["eval/rouge_1", "eval/rouge_2", "eval/rouge_L"],
}


@pytest.mark.parametrize("task,extra", [("imdb", ["--save-model", "--save-path", "saved"]),
                                        ("commongen", []),
                                        ("tldr", ["--bf16"])])
def test_two_iterations_per_task(assets, tmp_path, capsys, task, extra):
    run_script_in_process("ppo.py", task_args(assets, task) + extra, cwd=tmp_path)  # (real processes: the slow tier's)
    assert "iteration 2/2" in capsys.readouterr().out
    events = read_tensorboard(tmp_path)
    tags = events.Tags()["scalars"]
    for tag in DOCUMENTED_TAGS + EVAL_TAGS[task]:
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("objective/scores")] == [4, 8]
    text_tags = events.Tags()["tensors"]
    assert any("hyperparameters" in t for t in text_tags) and any("samples" in t for t in text_tags)
    if "--save-model" in extra:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
        assert model.config.vocab_size == len(tokenizer)
        original = AutoModelForCausalLM.from_pretrained(assets["policy"])
        changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters())]
        assert any(changed), "the saved policy should be the trained one"


@pytest.mark.slow
def test_bad_input_fails_fast_with_one_clear_line(assets, tmp_path):
    imdb = task_args(assets, "imdb")

    def with_flag(args, flag, value):
        args = list(args)
        args[args.index(flag) + 1] = value
        return args

    write_jsonl(tmp_path / "no_text.jsonl", [{"review": "a"}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "unreadable.jsonl").write_bytes(b"\xff\xfe\xfa")
    cases = [
        (with_flag(imdb, "--task", "sentiment"), "unknown task 'sentiment'"),
        (with_flag(imdb, "--batch-size", "3"), "--total-episodes / --batch-size: 8 is not divisible by 3"),
        (with_flag(imdb, "--num-minibatches", "3"), "--batch-size / --num-minibatches: 4 is not divisible by 3"),
        (with_flag(imdb, "--dataset-path", str(tmp_path / "missing.jsonl")), "--dataset-path not found"),
        (with_flag(imdb, "--dataset-path", str(tmp_path / "nofolder")), "--dataset-path not found"),
        (with_flag(imdb, "--dataset-path", str(tmp_path / "no_text.jsonl")), "row 1 lacks the field(s): text"),
        (with_flag(imdb, "--dataset-path", str(tmp_path / "empty.jsonl")), "is empty"),
        (with_flag(imdb, "--dataset-path", str(tmp_path / "broken.jsonl")), "line 2 is not valid JSON"),
        (with_flag(imdb, "--dataset-path", str(tmp_path / "unreadable.jsonl")), "cannot read dataset file"),
        (with_flag(imdb, "--model-name-or-path", str(tmp_path / "no_model")), "--model-name-or-path: no such model folder"),
        (with_flag(imdb, "--reward-model", "./no_classifier"), "--reward-model: no such model folder"),
        (imdb + ["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
        (imdb + ["--bf16", "--fp16"], "--bf16 and --fp16: choose one"),
        (with_flag(imdb, "--batch-size", "0"), "--batch-size must be positive, got 0"),
        (imdb + ["--gamma", "2"], "--gamma must be in (0, 1], got 2.0"),
        (imdb + ["--gae-lambda", "-0.1"], "--gae-lambda must be in [0, 1], got -0.1"),
        (imdb + ["--kl-coef", "-0.5"], "--kl-coef must be at least 0, got -0.5"),
        (imdb + ["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (with_flag(imdb, "--model-name-or-path", "nobody/no-such-model"),
         "--model-name-or-path: cannot load nobody/no-such-model from the Hugging Face hub"),
        ([a for a in imdb if a not in ("--dataset-path", assets["data"]["imdb"])],
         "cannot load the hub dataset imdb (train)"),
    ]
    for args, message in cases:  # in-process: the same code path as the command line, without the start-up cost
        with pytest.raises(SystemExit) as exit_info:
            run_script_in_process("ppo.py", args, cwd=tmp_path)
        error = str(exit_info.value.code)  # a string code: Python prints it to stderr and exits with 1
        assert error.startswith("error: ") and "\n" not in error and message in error, (message, error)
    assert not os.path.exists(tmp_path / "runs"), "nothing may start before the input is checked"
    # and once as a real process: one line on stderr, exit code 1
    result = run_script("ppo.py", cases[1][0], cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == ["error: " + cases[1][1]]


@pytest.mark.parametrize("script", RL_SCRIPTS)
@pytest.mark.slow
def test_evaluation_does_not_change_training(assets, tmp_path, script):
    """Evaluations sample from their own seeded stream: the same seed trains the same with or without them."""
    scores = {}
    for eval_every in ("0", "1"):
        cwd = tmp_path / eval_every
        cwd.mkdir()
        run_script_in_process(script, task_args(assets, "imdb", script) + ["--eval-every", eval_every], cwd)
        scores[eval_every] = [e.value for e in read_tensorboard(cwd).Scalars("objective/scores")]
    assert scores["0"] == scores["1"]
