"""The guided scripts' guide/ scalars: how the guide's episodes went beside the policy's own, every rank's; and
val/equal_score_groups, the groups of a prompt's samples (--samples-per-prompt) that RLOO can teach nothing.

An episode is mixed where the guide wrote part of it (k > 0 of its tokens: PPO++'s and DR-PO's roll-in, AggreVaTeD's
and D2LOLS's roll-out), unmixed where one model wrote it all.
"""

import torch.nn as nn

from common import distributed


def equal_groups(scores, samples_per_prompt):
    """Per group of `samples_per_prompt` episodes (a prompt's samples, one after the other): 1.0 where the group's
    scores are all equal (their leave-one-out advantages are all 0 without a KL penalty), else 0.0."""
    groups = scores.view(-1, samples_per_prompt)
    return (groups == groups[:, :1]).all(1).float()


def equal_score_groups(scores, samples_per_prompt):
    """val/equal_score_groups: the share of every rank's groups whose scores are all equal."""
    return {"val/equal_score_groups": distributed.mean(equal_groups(scores, samples_per_prompt)).item()}


def correlation(x, y, mask):
    """Pearson's correlation of x and y over the masked entries of every rank; None where either does not vary."""
    mean_x, mean_y = distributed.masked_mean(x, mask), distributed.masked_mean(y, mask)
    covariance = distributed.masked_mean((x - mean_x) * (y - mean_y), mask)
    spread = (distributed.masked_var(x, mask) * distributed.masked_var(y, mask)).sqrt()
    return (covariance / spread).item() if spread > 0 else None


def mixing_logs(mixed, k, scores, values, returns, restart_from, unmixed=None, samples_per_prompt=1):
    """guide/mixed_fraction; over the mixed episodes guide/mean_k, guide/score_mixed, guide/k_score_correlation (a
    deeper restart, a higher score?) and guide/explained_variance_restart: the critic at the restart states, the first
    token of `restart_from` (a mask, batch x tokens) in each mixed episode, where the roll-in ends; over the unmixed
    ones guide/score_unmixed and, given `unmixed` = (the advantages the loss uses, GAE's before normalisation, the
    tokens whose mean is taken), guide/advantage_unmixed and guide/gae_unmixed. With `samples_per_prompt` > 1
    (a group shares its state), guide/equal_score_groups_mixed and _unmixed: val/equal_score_groups of each kind.
    `mixed` and `k` are per episode; scores too."""
    logs = {"guide/mixed_fraction": distributed.mean(mixed).item()}
    equal = equal_groups(scores, samples_per_prompt) if samples_per_prompt > 1 else None
    group_mixed = mixed[::samples_per_prompt]  # (a group is one state: mixed or not as a whole)
    if logs["guide/mixed_fraction"] > 0:  # (a fraction over every rank: each rank takes the same branch)
        restarts = restart_from * (1 - nn.functional.pad(restart_from[:, :-1], (1, 0))) * mixed[:, None]
        logs["guide/mean_k"] = distributed.masked_mean(k.float(), mixed).item()
        logs["guide/score_mixed"] = distributed.masked_mean(scores, mixed).item()
        k_score = correlation(k.float(), scores, mixed)  # (not logged where k or the score does not vary)
        if k_score is not None:
            logs["guide/k_score_correlation"] = k_score
        if equal is not None:
            logs["guide/equal_score_groups_mixed"] = distributed.masked_mean(equal, group_mixed).item()
        if values is not None:  # (rloo: no critic)
            logs["guide/explained_variance_restart"] = distributed.explained_variance(values, returns, restarts).item()
    if logs["guide/mixed_fraction"] < 1:
        logs["guide/score_unmixed"] = distributed.masked_mean(scores, 1 - mixed).item()
        if equal is not None:
            logs["guide/equal_score_groups_unmixed"] = distributed.masked_mean(equal, 1 - group_mixed).item()
        if unmixed is not None:
            advantages, raw_advantages, tokens = unmixed
            tokens = tokens * (1 - mixed[:, None])
            logs["guide/advantage_unmixed"] = distributed.masked_mean(advantages, tokens).item()  # the loss's
            logs["guide/gae_unmixed"] = distributed.masked_mean(raw_advantages, tokens).item()  # before normalisation
    return logs
