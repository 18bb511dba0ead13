"""Unit tests for the parts that are easy to get subtly wrong, run against *every* script's own copy.

The four RL scripts (and sft.py) repeat their helpers on purpose, so each copy can break on its own:
every test here is parametrised over the modules that carry the helper it tests.
"""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

import ppo
from common import tasks
from conftest import GUIDED_MODULES, RL_MODULES, module_name, sft

WITH_SFT = RL_MODULES + [sft]
rl_modules = pytest.mark.parametrize("module", RL_MODULES, ids=module_name)
guided_modules = pytest.mark.parametrize("module", GUIDED_MODULES, ids=module_name)


def kl_rewards(module, scores, logprobs, ref_logprobs, mask, kl_coef, policy_mask=None):
    """The module's kl_penalized_rewards; the guided scripts also take the policy's tokens (default: all)."""
    if module is ppo:
        return module.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    policy_mask = mask if policy_mask is None else policy_mask
    return module.kl_penalized_rewards(scores, logprobs, ref_logprobs, policy_mask, mask, kl_coef)


def loss(module, new_logprobs, new_values, old_logprobs, old_values, advantages, returns, mask, args, value_mask=None):
    """The module's ppo_loss on one whole minibatch (its token counts: the masks' sums); AggreVaTeD's and D2LOLS's
    also take the value loss's tokens (default: `mask`)."""
    if "value_mask" in inspect.signature(module.ppo_loss).parameters:
        value_mask = mask if value_mask is None else value_mask
        return module.ppo_loss(new_logprobs, new_values, old_logprobs, old_values, advantages, returns, mask,
                               value_mask, mask.sum(), value_mask.sum(), args)
    return module.ppo_loss(new_logprobs, new_values, old_logprobs, old_values, advantages, returns, mask, mask.sum(),
                           args)


@rl_modules
def test_gae_matches_a_hand_worked_example(module):
    # row 0: three tokens, score 1 at the end; row 1: the episode ended after two tokens (EOS),
    # the value past the end is garbage and must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = module.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # by hand: delta_t = r_t + 0.9 V_{t+1} - V_t ; A_t = delta_t + 0.72 A_{t+1}
    #   row 0: A2 = 1 - 0.3 = 0.7 ; A1 = (0.27 - 0.4) + 0.72 * 0.7 = 0.374 ; A0 = (0.36 - 0.5) + 0.72 * 0.374 = 0.12928
    #   row 1: A1 = 2 - 0.4 = 1.6 ; A0 = (0.36 - 0.5) + 0.72 * 1.6 = 1.012
    torch.testing.assert_close(advantages, torch.tensor([[0.12928, 0.374, 0.7], [1.012, 1.6, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.62928, 0.774, 1.0], [1.512, 2.0, 0.0]]))


@rl_modules
def test_kl_penalty_on_every_token_and_score_on_the_last(module):
    scores = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl, rewards = kl_rewards(module, scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = log pi - log pi_ref; reward = -0.1 kl, + the score on the last token of the episode
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.1], [-0.1, 2.0, 0.0]]))


@guided_modules
def test_kl_only_on_the_policys_tokens_and_the_score_on_the_episodes_last(module):
    # PPO++: a 1-token roll-in (state) then 2 policy tokens; AggreVaTeD: 2 policy tokens then the guide's
    scores = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[0.0, -1.0, -3.0], [-1.0, -1.0, 0.0]])
    ref_logprobs = torch.tensor([[-4.0, -2.0, -2.0], [-2.0, -1.5, -7.0]])
    mask = torch.ones(2, 3)
    policy_mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl, rewards = kl_rewards(module, scores, logprobs, ref_logprobs, mask, 0.1, policy_mask=policy_mask)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, 1.1], [-0.1, -0.05, 2.0]]))


@pytest.mark.parametrize("module", RL_MODULES, ids=module_name)
def test_mask_after_eos_keeps_the_eos_and_drops_what_follows(module):
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(module.mask_after_eos(responses, eos_token_id=2), expected)


def normalize(module, advantages, mask, how, mixed=None):
    """The module's normalize_advantages; PPO++'s and D2LOLS's also take the mixed episodes (default: none, one
    group: the whole batch, as ppo.py)."""
    if "mixed" in inspect.signature(module.normalize_advantages).parameters:
        mixed = torch.zeros(len(advantages)) if mixed is None else mixed
        return module.normalize_advantages(advantages, mask, how, mixed)
    return module.normalize_advantages(advantages, mask, how)


@rl_modules
def test_advantages_are_normalised_over_the_masked_entries_only(module):
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # masked entries 1, 2, 3, 4: mean 2.5, variance 1.25
    whitened = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / 1.25**0.5
    torch.testing.assert_close(normalize(module, x, mask, "whiten"), whitened, atol=1e-6, rtol=1e-6)
    # scale keeps each sign (AggreVaTeD's: better or worse than the guide); none is tril's raw GAE
    scaled = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]) / 1.25**0.5
    torch.testing.assert_close(normalize(module, x, mask, "scale"), scaled, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(normalize(module, x, mask, "none"), x * mask)


@pytest.mark.parametrize("module", WITH_SFT, ids=module_name)
def test_left_pad_and_position_ids(module):
    ids, mask = module.left_pad([[7, 8, 9], [5]], pad_token_id=0, device="cpu")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert module.position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@rl_modules
def test_token_logprobs_and_entropy_at_a_temperature(module):
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 0]])
    expected = torch.log_softmax(logits / 0.5, -1)
    torch.testing.assert_close(module.token_logprobs(logits, tokens, 0.5), expected[0, [0, 1], [2, 0]][None])
    entropy = -(expected.exp() * expected).sum(-1)
    torch.testing.assert_close(module.entropy_from_logits(logits, 0.5), entropy)
    assert module.entropy_from_logits(logits, 0.5)[0, 1].item() == pytest.approx(math.log(3))


# The clipped objective by hand (clip 0.2): ratio r = exp(new - old), loss_t = max(-A r, -A clip(r, 0.8, 1.2)).
#   r 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped: no push beyond 1.2, zero gradient)
#   r 1.5, A -1: max( 1.5,  1.2) =  1.5 (unclipped: the pessimistic bound keeps the gradient)
#   r 0.5, A +1: max(-0.5, -0.8) = -0.5 (unclipped)
#   r 0.5, A -1: max( 0.5,  0.8) =  0.8 (clipped, zero gradient)
#   r 1.1, A +2: -2.2 (inside the range)
#   a 6th token with r 10 is masked out: it must change nothing.
RATIOS, ADVANTAGES = [1.5, 1.5, 0.5, 0.5, 1.1, 10.0], [1.0, -1.0, 1.0, -1.0, 2.0, 5.0]
TOKEN_MASK = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@rl_modules
def test_clipped_surrogate_against_hand_worked_numbers(module):
    args = module.Args(clip_coef=0.2, clip_coef_value=0.2, vf_coef=0.5)
    new_logprobs = torch.tensor([RATIOS]).log().requires_grad_()
    zeros = torch.zeros(1, 6)
    total, stats = loss(module, new_logprobs, zeros, zeros, zeros, torch.tensor([ADVANTAGES]), zeros,
                        torch.tensor([TOKEN_MASK]), args)
    assert total.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5)  # the mean over the 5 tokens
    # the statistics are sums over the tokens (the logs divide by every token the update saw)
    assert stats["policy_loss"].item() == pytest.approx(-1.2 + 1.5 - 0.5 + 0.8 - 2.2)
    assert stats["clipfrac"].item() == pytest.approx(4)
    assert stats["ratio"].item() == pytest.approx(1.5 + 1.5 + 0.5 + 0.5 + 1.1)
    log_ratios = [math.log(r) for r in RATIOS[:5]]
    assert stats["approxkl"].item() == pytest.approx(0.5 * sum(x * x for x in log_ratios))  # k2, as sfd
    total.backward()
    # d loss / d log r = -A r / 5 where the unclipped term is taken, 0 where the clip holds (and off the mask)
    torch.testing.assert_close(new_logprobs.grad, torch.tensor([[0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.2 / 5, 0.0]]))


# The clipped value loss by hand (old values 0, clip 0.2): 0.5 * max((v - R)^2, (clip(v, -0.2, 0.2) - R)^2)
#   v  0.5, R  1: max(0.25, 0.64) = 0.64 (the clipped value is further: it counts, zero gradient)
#   v  0.5, R -1: max(2.25, 1.44) = 2.25 (unclipped, gradient 2 (v - R))
#   v  0.1, R  1: 0.81 (inside the range)
#   v -0.5, R -1: max(0.25, 0.64) = 0.64 (clipped, zero gradient)
@rl_modules
def test_clipped_value_loss_against_hand_worked_numbers(module):
    args = module.Args(clip_coef=0.2, clip_coef_value=0.2, vf_coef=0.5)
    new_values = torch.tensor([[0.5, 0.5, 0.1, -0.5, 3.0]], requires_grad=True)
    returns = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    zeros = torch.zeros(1, 5)
    total, stats = loss(module, zeros, new_values, zeros, zeros, zeros, returns, mask, args)
    assert stats["value_loss"].item() == pytest.approx(0.5 * (0.64 + 2.25 + 0.81 + 0.64))  # a sum over the tokens
    assert total.item() == pytest.approx(0.5 * stats["value_loss"].item() / 4)  # vf_coef x the mean; no policy term
    total.backward()
    # 0.5 (vf_coef) * 0.5 * 2 (v - R) / 4 where unclipped, 0 where the clip holds
    torch.testing.assert_close(new_values.grad, torch.tensor([[0.0, 0.5 * 1.5 / 4, 0.5 * -0.9 / 4, 0.0, 0.0]]))


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@rl_modules
def test_left_padded_batch_gives_the_logprobs_of_unpadded_sequences(assets, module, arch):
    """GPT-2's learned absolute positions see a position-id bug; Llama's rotary ones cannot (a constant
    shift per row cancels in q.k), so the Llama case checks the attention mask and the cache-free pass."""
    tokenizer = assets["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval() if arch == "gpt2" else tiny_llama(tokenizer)
    texts = ["the movie was good and the music", "a dog runs in the park", "sad ending of a very long boring film with a cat"]
    sequences = [tokenizer(t).input_ids for t in texts]
    response_length = 3  # score the last 3 tokens of each sequence
    ids, mask = module.left_pad(sequences, tokenizer.pad_token_id, "cpu")
    assert mask.sum(1).tolist() != [ids.shape[1]] * 3  # the batch really is padded
    with torch.no_grad():
        batched = module.token_logprobs(module.response_logits(model, ids, mask, response_length),
                                        ids[:, -response_length:], temperature=0.7)
        for i, seq in enumerate(sequences):
            single_ids = torch.tensor([seq])
            single = module.token_logprobs(module.response_logits(model, single_ids, torch.ones_like(single_ids),
                                                                  response_length), single_ids[:, -response_length:], 0.7)
            torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-5)


@rl_modules
def test_critic_values_ignore_left_padding(assets, module):
    tokenizer = assets["tokenizer"]
    critic = module.Critic(assets["policy"]).eval()
    torch.nn.init.normal_(critic.value_head.weight)  # the zero init would make any check pass
    sequences = [tokenizer("the movie was good and the music").input_ids, tokenizer("a dog runs").input_ids]
    ids, mask = module.left_pad(sequences, tokenizer.pad_token_id, "cpu")
    assert mask[1, 0] == 0 and len(sequences[1]) > 2
    with torch.no_grad():
        batched = critic(ids, mask, 2)
        single = critic(torch.tensor([sequences[1]]), torch.ones(1, len(sequences[1]), dtype=torch.long), 2)
    torch.testing.assert_close(batched[1], single[0], atol=1e-5, rtol=1e-5)


@rl_modules
def test_training_pass_reproduces_rollout_logprobs_before_the_first_update(assets, module):
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
        args = module.Args(max_new_tokens=12, temperature=0.7, rollout_batch_size=3)  # two generate calls
        ids = SimpleNamespace(eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id)
        no_roll_in = [[] for _ in prompts]  # PPO++ and D2LOLS: a plain episode
        extra = [no_roll_in] if "roll_ins" in inspect.signature(module.rollout).parameters else []
        return module.rollout(policy, ids, prompts, config, args, "cpu", *extra)[:5]

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
        logits = module.response_logits(policy, query_responses, attention_mask, responses.shape[1])
        new_logprobs = module.token_logprobs(logits, responses, temperature=0.7)
    values = torch.zeros_like(new_logprobs)
    args = module.Args(clip_coef=0.2, clip_coef_value=0.2, vf_coef=0.1)
    _, stats = loss(module, new_logprobs, values, logprobs, values, torch.ones_like(values), values, mask.float(), args)
    assert abs(stats["ratio"].item() / mask.sum().item() - 1) < 1e-5  # (sums over the tokens)
    assert stats["approxkl"].item() / mask.sum().item() < 1e-10
    assert stats["clipfrac"].item() == 0
    torch.testing.assert_close(new_logprobs * mask, logprobs * mask, atol=1e-5, rtol=0)


def test_exact_div_names_the_flags():
    assert tasks.exact_div(12, 4, "x") == 3
    with pytest.raises(SystemExit, match="error: --a / --b: 10 is not divisible by 4"):
        tasks.exact_div(10, 4, "--a / --b")
    with pytest.raises(SystemExit, match="not divisible by 0"):
        tasks.exact_div(10, 0, "--a / --b")


@rl_modules
def test_reference_nll_is_the_mean_nll_of_the_reference_tokens(assets, module):
    """tril's target regularisation term: reference_batch's left-padded prompt | reference rows (references of
    different lengths), the NLL of the reference tokens only (token-weighted over the batch), each predicted
    from everything before it."""
    tokenizer = assets["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    pairs = [(tokenizer("the film was").input_ids, tokenizer(" good fun").input_ids + [tokenizer.eos_token_id]),
             (tokenizer("a long prompt about a movie and a plot").input_ids, tokenizer(" yes").input_ids)]
    examples = [{"prompt_ids": p, "target_ids": t} for p, t in pairs]  # references of different lengths
    ids, attention_mask, target_mask = module.reference_batch(examples, tokenizer.pad_token_id, "cpu")
    assert target_mask.sum(1).tolist() == [len(t) for _, t in pairs]
    with torch.no_grad():
        nll = module.reference_nll(model, ids, attention_mask, target_mask, target_mask.sum())
        total, count = 0.0, 0
        for prompt, target in pairs:
            row = torch.tensor([prompt + target])
            logprobs = model(input_ids=row).logits[0, :-1].float().log_softmax(-1)
            total -= sum(logprobs[t - 1, row[0, t]].item() for t in range(len(prompt), len(prompt) + len(target)))
            count += len(target)
    assert nll.item() == pytest.approx(total / count, rel=1e-5)
