"""evaluate() (common/metrics.py, which every script calls) end to end on every task: what is generated, cut
and scored."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2LMHeadModel

from common import metrics, rewards, tasks
from conftest import tiny_gpt2_config

H = 8


@pytest.fixture(scope="module")
def policy(assets):
    """A tiny GPT-2 whose greedy text varies (the default init repeats one token), so EOS lands part-way."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(assets["tokenizer"], initializer_range=0.5)).eval()


def greedy_alone(policy, prompt_ids, eos_token_id):
    """The policy's greedy continuation of one unpadded prompt, up to and including the first EOS."""
    ids = torch.tensor([prompt_ids])
    out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=H,
                          eos_token_id=eos_token_id, pad_token_id=eos_token_id)[0, len(prompt_ids) :].tolist()
    return out[: out.index(eos_token_id) + 1] if eos_token_id in out else out


@pytest.mark.parametrize("task", tasks.TASKS)
def test_evaluate_scores_what_the_policy_wrote(assets, policy, task):
    tokenizer = assets["tokenizer"]
    rows = tasks.load_rows(task, "validation", dataset_path=assets["data"][task])
    examples = tasks.make_examples(task, rows, tokenizer, max_prompt_length=24)[:5]
    for i, e in enumerate(examples):  # prompts of different lengths: left padding
        e["prompt_ids"] = e["prompt_ids"][2 * i :]
        e["prompt"] = tokenizer.decode(e["prompt_ids"], skip_special_tokens=True)
    # an "EOS" that the greedy continuations write part-way through, so some end early and some don't
    greedy = [greedy_alone(policy, e["prompt_ids"], tokenizer.eos_token_id) for e in examples]
    eos = next(t for t in sorted({t for g in greedy for t in g[1:-1]}) if 0 < sum(t in g for g in greedy) < len(greedy))
    expected = [tokenizer.decode(greedy_alone(policy, e["prompt_ids"], eos), skip_special_tokens=True) for e in examples]
    assert any(text.endswith(tokenizer.decode([eos])) for text in expected)

    references = [e["references"] for e in examples]
    train_references = references if task == "commongen" else None
    reward_model = {"imdb": assets["classifier"], "commongen": None, "tldr": assets["reward_model"]}[task]
    reward_fn = rewards.make_reward_fn(task, reward_model, "cpu", train_references=train_references)
    scored = []

    def recorded_reward_fn(prompts, continuations, refs):
        scored.append((continuations, reward_fn(prompts, continuations, refs)))
        return scored[-1][1]

    policy_tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, decode=tokenizer.decode)
    perplexity_lm = (AutoModelForCausalLM.from_pretrained(assets["toy_guide"]).eval(),
                     AutoTokenizer.from_pretrained(assets["toy_guide"]))
    no_autocast = torch.autocast("cpu", enabled=False)

    def evaluate(config):
        scored.clear()
        return metrics.evaluate(policy, policy_tokenizer, examples, config, recorded_reward_fn, perplexity_lm, task,
                                3, "cpu", no_autocast)  # (3 a call: two generate calls)

    lengths = dict(max_new_tokens=H, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    result, generations = evaluate(GenerationConfig(do_sample=False, **lengths))
    continuations = [text for texts, _ in scored for text in texts]
    assert continuations == expected  # the policy's own text, cut after the first EOS, padding ignored
    scores = torch.cat([s for _, s in scored])
    assert result["score"] == pytest.approx(scores.mean().item())
    torch.testing.assert_close(scores, reward_fn([e["prompt"] for e in examples], expected, references).float())
    prompts = [e["prompt"] for e in examples]
    for name, value in metrics.task_metrics(task, prompts, expected, references).items():
        assert result[name] == pytest.approx(value), name
    if task == "imdb":
        assert result["perplexity"] == pytest.approx(
            metrics.output_perplexity(*perplexity_lm, prompts, expected, "cpu"))
    # every generation comes back (for the JSON Lines file), each row with its own prompt, references and score
    assert generations == [dict(prompt=p, continuation=c, references=r, score=s)
                           for p, c, r, s in zip(prompts, expected, references, scores.tolist())]

    # pad = EOS, as GPT-2 and SmolLM2 are used: generate cannot tell the left padding from EOS by itself
    real_eos = tokenizer.eos_token_id
    pad_is_eos = SimpleNamespace(eos_token_id=real_eos, pad_token_id=real_eos, decode=tokenizer.decode)
    scored.clear()
    metrics.evaluate(policy, pad_is_eos, examples, GenerationConfig(do_sample=False, max_new_tokens=H, eos_token_id=real_eos,
                     pad_token_id=real_eos), recorded_reward_fn, perplexity_lm, task, 3, "cpu", no_autocast)
    assert [text for texts, _ in scored for text in texts] == [
        tokenizer.decode(greedy_alone(policy, e["prompt_ids"], real_eos), skip_special_tokens=True) for e in examples]

    # sampling: reproducible under a seed, and not the greedy text
    sampled = []
    for _ in range(2):
        torch.manual_seed(0)
        evaluate(GenerationConfig(do_sample=True, top_k=0, **lengths))
        sampled.append([text for texts, _ in scored for text in texts])
    assert sampled[0] == sampled[1] and sampled[0] != expected
