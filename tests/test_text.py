"""Text in context (common/text.py): what the reward, the metrics, the target regularisation and the guide
read is the whole episode's text, also under a SentencePiece tokenizer, whose pieces decoded alone lose
their word's leading space ("...was" + "great" -> "...wasgreat")."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from common import metrics, rewards, tasks, text
from conftest import RL_SCRIPTS, Spy, run_script_in_process, set_flags, task_args

# the function whose result holds each script's episodes: (left-padded prompt ids, mask, responses, ...)
EPISODES = {"ppo.py": "rollout", "ppo_plus_plus.py": "rollout", "aggrevated.py": "guide_roll_out",
            "d2lols.py": "guide_roll_out"}


def whole_text(tokenizer, prompt_ids, responses):
    """The episode decoded as one sequence (padding and EOS are special tokens and vanish)."""
    return tokenizer.decode(prompt_ids.tolist() + responses.tolist(), skip_special_tokens=True)


def test_the_fixture_loses_the_space_when_a_continuation_is_decoded_alone(metaspace):
    """Without this, the tests below could not fail: alone, "▁great" decodes to "great"."""
    tokenizer, _ = metaspace
    ids = tokenizer("this movie was great", add_special_tokens=False).input_ids
    prompt_ids = tokenizer("this movie was", add_special_tokens=False).input_ids
    assert ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(ids[len(prompt_ids) :]) == "great"
    assert text.decode_in_context(tokenizer, prompt_ids, ids[len(prompt_ids) :]) == " great"
    assert text.decode_continuations(tokenizer, [prompt_ids], [torch.tensor(ids[len(prompt_ids) :])]) == [" great"]


def test_text_is_decoded_and_encoded_in_context(assets, metaspace):
    """On a SentencePiece-style and a byte-level tokenizer: a piece decoded alone loses its word's space, and
    text encoded alone opens a word ("the" + "!" would read "the !")."""
    for tokenizer in (metaspace[0], assets["tokenizer"]):
        context = "this movie was the"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        for piece in (" good fun.", "! and the dog"):
            ids = text.encode_in_context(tokenizer, context, piece)
            assert tokenizer.decode(context_ids + ids) == context + piece
            assert text.decode_in_context(tokenizer, context_ids, ids) == piece
    tokenizer = metaspace[0]
    assert tokenizer.decode(tokenizer("the", add_special_tokens=False).input_ids
                            + tokenizer("!", add_special_tokens=False).input_ids) == "the !"  # alone: it would


def test_a_switch_inside_a_word_gets_no_spurious_space(assets, metaspace):
    """The policy stopped inside a word ("a good mov") and the guide's text finishes it ("ie and"): with a
    SentencePiece tokenizer "mov" + "ie" fuse into "▁movie", so the context's ids are no prefix of the whole's,
    and the text encoded alone opens a word: "a good mov ie and". The policy must read "a good movie and"."""
    for tokenizer in (metaspace[0], assets["tokenizer"]):
        context = "the movie was a good mov"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        whole = tokenizer(context + "ie and", add_special_tokens=False).input_ids
        if tokenizer is metaspace[0]:
            assert whole[: len(context_ids)] != context_ids  # the case this test is for
        ids = text.encode_in_context(tokenizer, context, "ie and")
        assert tokenizer.decode(context_ids + ids) == context + "ie and"


def test_the_eos_string_in_a_guides_text_is_text_not_eos(assets):
    """A guide that writes the policy's EOS string ("</s>") as text: it stays text, never the EOS token (which
    would end the policy's episode in the middle of the guide's sample)."""
    tokenizer = assets["tokenizer"]
    ids = text.encode_in_context(tokenizer, "the movie was", " good</s> fun")
    assert tokenizer.eos_token_id not in ids
    assert text.decode_in_context(tokenizer, tokenizer("the movie was").input_ids, ids) == " good</s> fun"


@pytest.mark.parametrize("script", RL_SCRIPTS)
def test_the_reward_scores_the_whole_episodes_text(assets, metaspace, tmp_path, monkeypatch, script):
    """Each loop, with a SentencePiece policy (and guide): the prompt + continuation text the reward reads is
    the episode decoded whole, where the continuation decoded alone would differ."""
    tokenizer, model = metaspace
    scored = []
    make_reward_fn = rewards.make_reward_fn

    def recording_make_reward_fn(*args, **kwargs):
        reward_fn = make_reward_fn(*args, **kwargs)

        def recorded(prompts, continuations, references):
            scored.append([p + c for p, c in zip(prompts, continuations)])
            return reward_fn(prompts, continuations, references)
        return recorded

    monkeypatch.setattr(rewards, "make_reward_fn", recording_make_reward_fn)
    args = set_flags(task_args(assets, "imdb", script), "--model-name-or-path", model, "--eval-every", 0)
    if script != "ppo.py":
        args = set_flags(args, "--guide-model", model, "--beta", 0.5)
    if script == "d2lols.py":
        args = set_flags(args, "--tau", 2)
    spy = Spy()
    run_script_in_process(script, args, tmp_path, spies={EPISODES[script]: spy})
    assert len(scored) == len(spy.calls) == 2
    differs = 0
    for texts, call in zip(scored, spy.calls):
        prompt_ids, _, responses = call.result[:3]
        for row, scored_text in enumerate(texts):
            assert scored_text == whole_text(tokenizer, prompt_ids[row], responses[row])
            prompt = tokenizer.decode(prompt_ids[row], skip_special_tokens=True)
            differs += scored_text != prompt + tokenizer.decode(responses[row], skip_special_tokens=True)
    assert differs > 0, "want episodes whose continuation decoded alone reads otherwise"


def test_evaluation_scores_and_saves_the_whole_generations_text(metaspace):
    """evaluate() (common/metrics.py, which every script calls): the text scored and written to the generations file is the prompt +
    continuation of the generated sequence decoded whole."""
    tokenizer, path = metaspace
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    outputs = []

    def generate(**kwargs):
        outputs.append(model.generate(**kwargs))
        return outputs[-1]

    prompts = ["this movie was", "the dog ran and", "a sad film", "the actor said the"]
    examples = [{"prompt": p, "prompt_ids": tokenizer(p, add_special_tokens=False).input_ids, "references": ["x"]}
                for p in prompts]
    scored = []

    def reward_fn(batch_prompts, continuations, references):
        scored.extend(p + c for p, c in zip(batch_prompts, continuations))
        return torch.zeros(len(continuations))

    config = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=0, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    _, generations = metrics.evaluate(SimpleNamespace(generate=generate), tokenizer, examples, config, reward_fn,
                                      None, "commongen", 3, "cpu", torch.autocast("cpu", enabled=False))
    whole = [tokenizer.decode(row, skip_special_tokens=True) for out in outputs for row in out.tolist()]
    assert scored == whole == [g["prompt"] + g["continuation"] for g in generations]
    assert any(g["continuation"].startswith(" ") for g in generations), "want a continuation that opens a word"


def test_reference_continuations_and_perplexity_read_text_in_context(metaspace):
    """tasks.continuation_ids (the target regularisation, sft.py) and metrics.output_perplexity encode a text
    after its prompt as the whole text encodes, not as the text alone would ("the" + "!" -> "the !")."""
    tokenizer, path = metaspace
    def after(prompt, reference):
        ids = tasks.continuation_ids(tokenizer, prompt, reference, max_length=20)
        assert ids[-1] == tokenizer.eos_token_id
        return tokenizer.decode(tokenizer(prompt, add_special_tokens=False).input_ids + ids, skip_special_tokens=True)

    assert after("the dog ", "ran") == "the dog ran"  # (alone: "the dog  ran", as after "TL;DR: ")
    assert after("the dog", "! ran") == "the dog ! ran"  # a space where neither side has one
    assert after("the dog.", " the cat") == "the dog. the cat"

    prompt = "this movie was the"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    seen = []

    def recording_model(input_ids, attention_mask):
        seen.append([row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)])
        return model(input_ids=input_ids, attention_mask=attention_mask)

    metrics.output_perplexity(recording_model, tokenizer, [prompt], ["! and the dog"], "cpu")
    assert seen == [[tokenizer(prompt + "! and the dog").input_ids]]
