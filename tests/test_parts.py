"""Unit tests for the parts of ppo.py that are easy to get subtly wrong."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

import ppo


def test_gae_matches_a_hand_worked_example():
    # row 0: three tokens, score 1 at the end; row 1: the episode ended after two tokens (EOS),
    # the value past the end is garbage and must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # by hand: delta_t = r_t + 0.9 V_{t+1} - V_t ; A_t = delta_t + 0.72 A_{t+1}
    #   row 0: A2 = 1 - 0.3 = 0.7 ; A1 = (0.27 - 0.4) + 0.72 * 0.7 = 0.374 ; A0 = (0.36 - 0.5) + 0.72 * 0.374 = 0.12928
    #   row 1: A1 = 2 - 0.4 = 1.6 ; A0 = (0.36 - 0.5) + 0.72 * 1.6 = 1.012
    torch.testing.assert_close(advantages, torch.tensor([[0.12928, 0.374, 0.7], [1.012, 1.6, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.62928, 0.774, 1.0], [1.512, 2.0, 0.0]]))


def test_kl_penalty_on_every_token_and_score_on_the_last():
    scores = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl, rewards = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.1], [-0.1, 2.0, 0.0]]))


def test_mask_after_eos_keeps_the_eos_and_drops_what_follows():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(ppo.mask_after_eos(responses, eos_token_id=2), expected)


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    white = ppo.masked_whiten(x, mask)
    # masked entries 1, 2, 3, 4: mean 2.5, variance 1.25
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / 1.25**0.5
    torch.testing.assert_close(white, expected, atol=1e-6, rtol=1e-6)


def test_left_pad():
    ids, mask = ppo.left_pad([[7, 8, 9], [5]], pad_token_id=0, device="cpu")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_gives_the_logprobs_of_unpadded_sequences(assets, arch):
    tokenizer = assets["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval() if arch == "gpt2" else tiny_llama(tokenizer)
    texts = ["the movie was good and the music", "a dog runs in the park", "sad ending of a very long boring film with a cat"]
    sequences = [tokenizer(t).input_ids for t in texts]
    response_length = 3  # score the last 3 tokens of each sequence
    ids, mask = ppo.left_pad(sequences, tokenizer.pad_token_id, "cpu")
    assert mask.sum(1).tolist() != [ids.shape[1]] * 3  # the batch really is padded
    with torch.no_grad():
        batched = ppo.token_logprobs(ppo.response_logits(model, ids, mask, response_length),
                                     ids[:, -response_length:], temperature=0.7)
        for i, seq in enumerate(sequences):
            single_ids = torch.tensor([seq])
            single = ppo.token_logprobs(ppo.response_logits(model, single_ids, torch.ones_like(single_ids),
                                                            response_length), single_ids[:, -response_length:], 0.7)
            torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-5)


def test_critic_values_ignore_left_padding(assets):
    tokenizer = assets["tokenizer"]
    critic = ppo.Critic(assets["policy"]).eval()
    torch.nn.init.normal_(critic.value_head.weight)  # the zero init would make any check pass
    sequences = [tokenizer("the movie was good and the music").input_ids, tokenizer("a dog runs").input_ids]
    ids, mask = ppo.left_pad(sequences, tokenizer.pad_token_id, "cpu")
    assert mask[1, 0] == 0 and len(sequences[1]) > 2
    with torch.no_grad():
        batched = critic(ids, mask, 2)
        single = critic(torch.tensor([sequences[1]]), torch.ones(1, len(sequences[1]), dtype=torch.long), 2)
    torch.testing.assert_close(batched[1], single[0], atol=1e-5, rtol=1e-5)


def test_training_pass_reproduces_rollout_logprobs_before_the_first_update(assets):
    """Ratio 1 and approx-KL 0 on a padded batch where some episodes end early with EOS: rollout
    (generate's logits, KV cache) and training (one forward pass) compute log-probs the same way,
    with the same temperature and no top-k truncation."""
    tokenizer = assets["tokenizer"]
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    texts = ["the movie was", "a dog runs in the park and the cat sat on the", "good", "funny sad love"]
    prompts = [tokenizer(t).input_ids for t in texts]

    def rollout(eos_token_id):
        torch.manual_seed(0)
        config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=5, top_p=1.0,
                                  eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  return_dict_in_generate=True, output_logits=True)
        args = ppo.Args(max_new_tokens=12, temperature=0.7, rollout_batch_size=3)  # two generate calls
        ids = SimpleNamespace(eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return ppo.rollout(policy, ids, prompts, config, args, "cpu")

    # use as "EOS" a token the model samples often, so some episodes end early and others don't
    responses = rollout(tokenizer.eos_token_id)[2]
    eos = int(torch.mode(responses.flatten()).values)
    prompt_ids, prompt_mask, responses, mask, logprobs = rollout(eos)
    assert 0 < (mask.sum(1) < responses.shape[1]).sum() < len(texts), "want both early-EOS and full-length rows"
    assert (prompt_mask == 0).any(), "want left padding"
    assert (responses[mask == 0] == tokenizer.pad_token_id).all()
    query_responses = torch.cat([prompt_ids, responses], 1)
    attention_mask = torch.cat([prompt_mask, mask], 1)

    with torch.no_grad():
        logits = ppo.response_logits(policy, query_responses, attention_mask, responses.shape[1])
        new_logprobs = ppo.token_logprobs(logits, responses, temperature=0.7)
    values = torch.zeros_like(new_logprobs)
    args = ppo.Args(clip_coef=0.2, clip_coef_value=0.2, vf_coef=0.1)
    _, stats = ppo.ppo_loss(new_logprobs, values, logprobs, values, torch.ones_like(values), values, mask.float(), args)
    assert abs(stats["ratio"].item() - 1) < 1e-5
    assert stats["approxkl"].item() < 1e-10
    assert stats["clipfrac"].item() == 0
    torch.testing.assert_close(new_logprobs * mask, logprobs * mask, atol=1e-5, rtol=0)
