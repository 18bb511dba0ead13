"""Metric values against known numbers.

The CIDEr-D and BLEU-4 numbers below were computed on 2026-11-23 with the reference implementations:
    pycocoevalcap 1.2: its full pipeline, `PTBTokenizer().tokenize` (Stanford CoreNLP 3.4.1 in Java) then
                      `Cider().compute_score(gts, res)`  (CIDEr-D, sigma 6), as CommonGen is evaluated
    nltk 3.10.4:      `nltk.translate.bleu_score.corpus_bleu(references, hypotheses)` (no smoothing) on the
                      Java PTB tokens
(a dev-only install, as benchmarks/cider_agreement.py; the project computes both itself at run time).
"""

import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from common import metrics, rewards
from conftest import tiny_gpt2_config

PREDICTIONS = [
    "A dog runs after the ball in the park.",
    "The man sits on a chair and reads a book.",
    "Children eat food at the table.",
    "cat tree",
]
REFERENCES = [
    ["The dog chases a ball across the park.", "A dog is running in the park after a ball.",
     "Dogs play with a ball in the park."],
    ["A man is sitting on the chair reading his book.", "The man reads a book while sitting in a chair."],
    ["The children are eating their food at the table.", "Kids eat at a table.",
     "A family eats food at the kitchen table."],
    ["A cat climbs up the tree.", "The cat is sitting in a tree."],
]


def test_cider_d_reproduces_pycocoevalcap():
    scores = metrics.cider_d(PREDICTIONS, REFERENCES)
    expected = [2.723370099516173, 2.3474757628861616, 2.707848215469398, 1.525055724538801]
    assert scores == pytest.approx(expected, rel=1e-12)
    assert sum(scores) / len(scores) == pytest.approx(2.3259374506026336, rel=1e-12)


def test_cider_d_clips_a_hypothesis_that_repeats_an_n_gram_more_often_than_its_references():
    """CIDEr-D (not CIDEr) clips each hypothesis n-gram's tf-idf by the reference's: repeating "dog" or "a dog runs
    in the park", as a reward-hacking policy does, earns no more than the references hold. Numbers: pycocoevalcap
    1.2's Cider().compute_score on these (already lower-case, punctuation-free) texts, computed 2026-11-25."""
    predictions = ["dog dog dog dog dog dog", "a dog runs in the park a dog runs in the park a dog runs",
                   "a cat sits on the mat"]
    references = [["a dog runs in the park", "the dog plays"], ["a dog runs in the park", "dogs run in a park"],
                  ["the cat sits on a mat", "a cat is on the mat"]]
    scores = metrics.cider_d(predictions, references)
    assert scores == pytest.approx([0.1678243954416106, 0.4680294014963554, 4.0625], rel=1e-12)


def test_cider_d_with_a_corpus_idf_differs_from_the_batch_idf():
    corpus_df = metrics.cider_document_frequency(REFERENCES + [["a dog and a cat"], ["the park is green"]])
    with_corpus = metrics.cider_d(PREDICTIONS[:1], REFERENCES[:1], corpus_df)
    alone = metrics.cider_d(PREDICTIONS[:1], REFERENCES[:1])
    assert with_corpus[0] > 0 and with_corpus != alone
    # with a single example every n-gram's idf is log(1) - log(1) = 0
    assert alone == [0.0]


# What Stanford's PTBTokenizer (pycocoevalcap 1.2, CoreNLP 3.4.1, -lowerCase) gives, then pycocoevalcap's
# punctuation removal: contractions split, abbreviations and times kept, brackets as -lrb-, "!!" kept.
PTB_CASES = [
    ("The man's dog doesn't like cats, and I can't swim!", "the man 's dog does n't like cats and i ca n't swim"),
    ("He won't go; they'll stay: we're done...", "he wo n't go they 'll stay we 're done"),
    ("Mr. Smith bought 1,000 apples for $3.50 at 5 p.m.", "mr. smith bought 1,000 apples for $ 3.50 at 5 p.m."),
    ("A well-known actor (John) sits on a chair -- reading.", "a well-known actor -lrb- john -rrb- sits on a chair reading"),
    ('She said "hello" to the kids.', "she said hello to the kids"),
    ("kids' toys are gonna break", "kids toys are gon na break"),
    ("Cannot stop!! Really?!", "can not stop !! really ?!"),
    ("o'clock rock'n'roll and/or 50% of the café", "o'clock rock 'n' roll and/or 50 % of the café"),
    ("A mom holds her son’s hand by 12:00pm.", "a mom holds her son 's hand by 12:00 pm"),
    ("The body is lying down.A man. e. there", "the body is lying down.a man e. there"),
    ("a fish., the picture.!! A... girl, the sleigh....", "a fish. the picture !! a. girl the sleigh"),
]


@pytest.mark.parametrize("text,expected", PTB_CASES)
def test_ptb_tokenize_matches_stanfords_tokenizer(text, expected):
    assert " ".join(metrics.ptb_tokenize(text)) == expected


def test_bleu_4_reproduces_nltk_corpus_bleu():
    assert metrics.bleu_4(PREDICTIONS, REFERENCES) == pytest.approx(0.31051915151139264, rel=1e-12)
    assert metrics.bleu_4(PREDICTIONS[:3], REFERENCES[:3]) == pytest.approx(0.3468524553703591, rel=1e-12)
    # brevity penalty, closest reference length, and a hypothesis shorter than 3 words
    predictions = ["the cat sat on the mat", "a dog"]
    references = [["the cat sat on the red mat today", "a cat sat on a mat"], ["a dog runs", "the dog barks loud"]]
    assert metrics.bleu_4(predictions, references) == pytest.approx(0.6240195441936915, rel=1e-12)


def test_bleu_4_is_zero_without_any_4gram_match_and_one_for_a_copy():
    assert metrics.bleu_4(["the cat sat down"], [["the cat sat up"]]) == 0.0
    assert metrics.bleu_4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)


def test_rouge_values():
    # unigrams: 2 of 3 match both ways -> F1 2/3; bigrams: "the cat" of 2 -> 1/2; LCS "the cat" -> 2/3
    result = metrics.rouge(["the cat sat"], [["the cat ran"]])
    assert result == pytest.approx({"rouge_1": 2 / 3, "rouge_2": 1 / 2, "rouge_L": 2 / 3})
    # with several references the best one counts; the mean runs over predictions
    result = metrics.rouge(["the cat sat", "a dog"], [["a bird flew", "the cat sat"], ["cats"]])
    assert result["rouge_1"] == pytest.approx(0.5)


def test_distinct_n():
    texts = ["the cat the cat", "the dog"]
    # unigrams: the, cat, the, cat, the, dog -> 3 distinct of 6; bigrams: 3 + 1 = 4, distinct 3
    assert metrics.distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 4)


def test_output_perplexity_of_a_uniform_model_is_the_vocabulary_size(assets):
    tokenizer = assets["tokenizer"]
    model = GPT2LMHeadModel(tiny_gpt2_config(tokenizer)).eval()
    torch.nn.init.zeros_(model.transformer.wte.weight)  # tied head: every logit is 0
    ppl = metrics.output_perplexity(model, tokenizer, ["the movie", "a dog runs in the"], [" was good", " park"], "cpu")
    assert ppl == pytest.approx(len(tokenizer), rel=1e-4)


def test_output_perplexity_counts_only_continuation_tokens(assets):
    tokenizer = assets["tokenizer"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(tokenizer)).eval()
    prompt, continuation = "the movie was", " good and funny"
    ids = tokenizer(prompt + continuation, return_tensors="pt").input_ids
    n_prompt = len(tokenizer(prompt).input_ids)
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    expected = math.exp(-logprobs[n_prompt - 1 :].mean().item())
    assert metrics.output_perplexity(model, tokenizer, [prompt], [continuation], "cpu") == pytest.approx(expected, rel=1e-4)


def test_imdb_reward_is_the_probability_of_the_chosen_label(assets):
    prompts, continuations = ["the movie was", "a sad film"], [" good fun", " and boring"]
    positive = rewards.make_reward_fn("imdb", assets["classifier"], "cpu", reward_label=1)(prompts, continuations, None)
    negative = rewards.make_reward_fn("imdb", assets["classifier"], "cpu", reward_label=0)(prompts, continuations, None)
    assert ((positive > 0) & (positive < 1)).all() and not torch.allclose(positive, negative)
    torch.testing.assert_close(positive + negative, torch.ones(2))
    with pytest.raises(SystemExit, match="--reward-label 2 is not a label"):
        rewards.make_reward_fn("imdb", assets["classifier"], "cpu", reward_label=2)


@pytest.mark.parametrize("task", ["imdb", "tldr"])
def test_a_texts_reward_does_not_depend_on_its_batch(assets, task):
    """The tiny reward models are GPT-2s (absolute positions) whose tokenizers pad on the left: padding
    must not shift a short text's positions when it is scored beside a long one."""
    reward_fn = rewards.make_reward_fn(task, assets["classifier" if task == "imdb" else "reward_model"], "cpu")
    prompts = ["a dog", "the movie was long and the story of the actor was very sad and boring"]
    continuations = [" runs", " but the music was good"]
    alone = torch.cat([reward_fn([p], [c], None) for p, c in zip(prompts, continuations)])
    torch.testing.assert_close(reward_fn(prompts, continuations, None), alone)
