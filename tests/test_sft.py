"""sft.py: the continuation-only loss mask, 2-step runs per task, and a saved model whose loss went down."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (RL_SCRIPTS, ROOT, Spy, read_tensorboard, run_script, run_script_in_process, set_flags, sft_args,
                      task_args)

spec = importlib.util.spec_from_file_location("sft", os.path.join(ROOT, "sft.py"))
sft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sft)


def test_loss_mask_covers_the_target_tokens_only():
    pairs = [([5, 6, 7], [8, 9]), ([5], [8, 9, 10])]
    input_ids, attention_mask, loss_mask = sft.sft_batch(pairs, pad_token_id=0, device="cpu")
    assert input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 5, 8, 9, 10]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]


def test_loss_is_the_continuation_nll_of_each_unpadded_row(assets):
    """Left padding changes nothing: the batch loss equals the token-weighted NLL of the rows one by one."""
    model = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    tokenizer = assets["tokenizer"]
    pairs = [(tokenizer("the film was").input_ids, tokenizer(" good fun").input_ids + [tokenizer.eos_token_id]),
             (tokenizer("a long prompt about a movie and a plot").input_ids, tokenizer(" yes").input_ids)]
    with torch.no_grad():
        loss = sft.sft_loss(model, *sft.sft_batch(pairs, tokenizer.pad_token_id, "cpu"))
        nll, count = 0.0, 0
        for prompt, target in pairs:
            ids = torch.tensor([prompt + target])
            logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            target_positions = range(len(prompt) - 1, len(prompt) + len(target) - 1)
            nll -= sum(logprobs[p, ids[0, p + 1]].item() for p in target_positions)
            count += len(target)
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)


def test_examples_per_task(assets):
    tokenizer = assets["tokenizer"]
    eos = tokenizer.eos_token_id
    rows = [{"text": "one two three four five six", "label": 1}, {"text": "bad bad bad bad", "label": 0}]
    [(prompt, target)] = sft.sft_examples("imdb", rows, tokenizer, 64, 48, imdb_label=1)  # positives only
    assert tokenizer.decode(prompt) == "one two three" and tokenizer.decode(target) == " four five six</s>"
    assert len(sft.sft_examples("imdb", rows, tokenizer, 64, 48, imdb_label=-1)) == 2
    [(_, cut)] = sft.sft_examples("imdb", rows[:1], tokenizer, 64, 2, imdb_label=1)
    assert len(cut) == 2 and eos not in cut  # a cut reference has no EOS
    rows = [{"concepts": ["dog", "ball"], "target": "The dog runs."}, {"concepts": ["dog", "ball"], "target": "A ball."}]
    pairs = sft.sft_examples("commongen", rows, tokenizer, 32, 20, imdb_label=1)
    assert [tokenizer.decode(t) for _, t in pairs] == [" The dog runs.</s>", " A ball.</s>"]
    assert tokenizer.decode(pairs[0][0]) == "generate a sentence with: dog ball."
    rows = [{"prompt": "POST: hi\nTL;DR:", "label": "short"}]
    [(prompt, target)] = sft.sft_examples("tldr", rows, tokenizer, 64, 50, imdb_label=1)
    assert tokenizer.decode(prompt + target) == "POST: hi\nTL;DR: short</s>"
    with pytest.raises(SystemExit, match="no training review has label 1"):
        sft.sft_examples("imdb", [{"text": "a b", "label": 0}], tokenizer, 64, 48, imdb_label=1)


@pytest.mark.parametrize("task", ["imdb", "commongen", "tldr"])
def test_two_steps_per_task(assets, tmp_path, capsys, task):
    precision = {"tldr": ["--bf16"], "commongen": ["--fp16"]}.get(task, [])  # both autocasts run on the CPU
    run_script_in_process("sft.py", sft_args(assets, task) + precision, cwd=tmp_path)
    assert "step 2/2" in capsys.readouterr().out
    events = read_tensorboard(tmp_path)
    tags = events.Tags()["scalars"]
    for tag in ["loss/sft", "charts/episodes", "charts/lr", "eval/score"]:
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("loss/sft")] == [4, 8]
    assert [e.step for e in events.Scalars("eval/score")] == [0, 4, 8]


@pytest.mark.slow
def test_saved_model_reloads_and_its_training_loss_went_down(assets, tmp_path):
    args = sft_args(assets, "commongen", steps=8) + ["--eval-every", "0", "--learning-rate", "3e-3",
                                                      "--save-model", "--save-path", "saved"]
    result = run_script("sft.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
    from common import tasks

    rows = tasks.load_rows("commongen", "train", dataset_path=assets["data"]["commongen"])
    batch = sft.sft_batch(sft.sft_examples("commongen", rows, tokenizer, 32, 6, 1), tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        before = sft.sft_loss(AutoModelForCausalLM.from_pretrained(assets["policy"]).eval(), *batch).item()
        after = sft.sft_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval(), *batch).item()
    assert after < before - 0.5, (before, after)


def test_bad_input_fails_fast(assets, tmp_path):
    cases = [
        (["--task", "poems"], "unknown task 'poems'"),
        (sft_args(assets, "imdb") + ["--batch-size", "3"], "--batch-size / --micro-batch-size: 3 is not divisible by 2"),
        (sft_args(assets, "imdb") + ["--dataset-path", str(tmp_path / "nope.jsonl")], "--dataset-path not found"),
        (sft_args(assets, "imdb") + ["--model-name-or-path", str(tmp_path / "nope")], "no such model folder"),
        (sft_args(assets, "imdb") + ["--max-steps", "0", "--num-epochs", "0"], "--num-epochs or --max-steps"),
        (sft_args(assets, "imdb") + ["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
        (sft_args(assets, "imdb") + ["--max-new-tokens", "0"], "--max-new-tokens must be positive, got 0"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as error:
            run_script_in_process("sft.py", args, tmp_path)
        assert message in str(error.value), (args, error.value)


@pytest.mark.parametrize("task,metric", [("imdb", "eval/perplexity"), ("commongen", "eval/cider_d")])
@pytest.mark.slow
def test_eval_only_evaluates_the_checkpoint_and_trains_nothing(assets, tmp_path, task, metric):
    result = run_script("sft.py", sft_args(assets, task) + ["--eval-only", "--save-model", "--num-sample-generations", "2"],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = read_tensorboard(tmp_path).Tags()["scalars"]
    assert "eval/score" in tags and metric in tags and "loss/sft" not in tags
    assert not (tmp_path / "models").exists()
    # the generations, one JSON object per held-out prompt, scored as eval/score
    [generations] = (tmp_path / "runs").glob("*/generations/step_000000.jsonl")
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    assert len(rows) == 4 and all(set(row) == {"prompt", "continuation", "references", "score"} for row in rows)
    [logged] = read_tensorboard(tmp_path).Scalars("eval/score")
    assert sum(row["score"] for row in rows) / 4 == pytest.approx(logged.value, abs=1e-6)


def test_a_non_finite_loss_stops_before_the_weights_change(assets, tmp_path):
    class NanLoss(Spy):
        def wrap(self, function):
            return lambda *args: function(*args) * float("nan")

    with pytest.raises(SystemExit) as stop:
        run_script_in_process("sft.py", sft_args(assets, "imdb") + ["--eval-every", "0"], tmp_path, {"sft_loss": NanLoss()})
    assert str(stop.value.code) == "error: step 1: the loss is not finite (nan or inf); stopped before the optimizer step"
    start = AutoModelForCausalLM.from_pretrained(assets["policy"])
    assert all(torch.equal(a, b) for a, b in zip(stop.value.script_globals["model"].parameters(), start.parameters()))


def test_the_checkpoints_generation_settings_do_not_leak_into_evaluation(assets, tmp_path):
    from transformers import GenerationConfig

    leaky = AutoModelForCausalLM.from_pretrained(assets["policy"])
    leaky.generation_config = GenerationConfig(do_sample=True, repetition_penalty=5.0, no_repeat_ngram_size=1)
    leaky.save_pretrained(tmp_path / "leaky")
    assets["tokenizer"].save_pretrained(tmp_path / "leaky")
    scores = {}
    for name, model in (("clean", assets["policy"]), ("leaky", str(tmp_path / "leaky"))):
        (tmp_path / name).mkdir(exist_ok=True)
        args = sft_args(assets, "imdb") + ["--model-name-or-path", model, "--eval-only"]
        with pytest.raises(SystemExit):  # --eval-only ends with SystemExit(0)
            run_script_in_process("sft.py", args, tmp_path / name)
        scores[name] = [e.value for e in read_tensorboard(tmp_path / name).Scalars("eval/score")]
    assert scores["leaky"] == scores["clean"]



@pytest.mark.parametrize("task", ["commongen", "imdb"])
def test_eval_decodes_as_the_rl_scripts_do(assets, tmp_path, task):
    """sft.py's evaluation generates with the RL scripts' settings (CommonGen: beam search with 5 beams, at least 5
    new tokens, as tril), so its zero-shot and SL rows sit beside the RL rows of a table."""
    class Caught(Exception):
        pass

    class FirstEvaluation(Spy):  # records the generation config of the first evaluate() call, then stops the run
        def wrap(self, function):
            def evaluate(model, tokenizer, examples, generation_config, *rest):
                self.calls.append(generation_config)
                raise Caught

            return evaluate

    configs = {}
    scripts = RL_SCRIPTS if task == "commongen" else ["ppo.py"]  # imdb: sampling, which the scripts share
    for script, args in [("sft.py", sft_args(assets, task) + ["--eval-only"])] + [
            (script, task_args(assets, task, script)) for script in scripts]:
        spy = FirstEvaluation()
        with pytest.raises(Caught):
            run_script_in_process(script, args + ["--max-new-tokens", "8"], tmp_path, {"evaluate": spy})
        settings = {"temperature": 1.0, "top_p": 1.0} | spy.calls[0].to_diff_dict()  # unset = 1.0, no scaling
        configs[script] = {key: value for key, value in settings.items() if key != "transformers_version"}
    expected = ({"num_beams": 5, "do_sample": False, "min_new_tokens": 5} if task == "commongen"
                else {"do_sample": True, "top_k": 50, "min_new_tokens": 8})
    for script, config in configs.items():
        assert {key: config.get(key) for key in expected} == expected, script
        assert config == configs["ppo.py"], script


def test_the_micro_batch_loop_never_waits_for_the_device(assets, tmp_path, monkeypatch):
    """A tensor's .item(), int() or float() waits for the device (a GPU sync). A step makes the same number of them
    however many micro-batches it is cut into (a loss.item() and an int() of the mask's max in each micro-batch
    made 2 more per micro-batch)."""
    calls = []
    for name in ("item", "__int__", "__float__"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_run = {}
    for micro_batch_size in ("1", "4"):  # 4 micro-batches a step, or 1
        (tmp_path / micro_batch_size).mkdir()
        calls.clear()
        run_script_in_process("sft.py", set_flags(sft_args(assets, "imdb"), "--eval-every", 0, "--micro-batch-size",
                                                  micro_batch_size), tmp_path / micro_batch_size)
        per_run[micro_batch_size] = len(calls)
    assert per_run["1"] == per_run["4"] > 0, per_run
