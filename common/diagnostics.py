"""The guided scripts' guide/ scalars: how the guide's episodes went beside the policy's own, every rank's.

An episode is mixed where the guide wrote part of it (k > 0 of its tokens: PPO++'s and DR-PO's roll-in, AggreVaTeD's
and D2LOLS's roll-out), unmixed where one model wrote it all.
"""

import torch.nn as nn

from common import distributed


def mixing_logs(mixed, k, scores, values, returns, restart_from, unmixed=None):
    """guide/mixed_fraction; over the mixed episodes guide/mean_k, guide/score_mixed and
    guide/explained_variance_restart: the critic at the restart states, the first token of `restart_from` (a mask,
    batch x tokens) in each mixed episode, where the roll-in ends; over the unmixed ones guide/score_unmixed and,
    given `unmixed` = (the advantages the loss uses, GAE's before normalisation, the tokens whose mean is taken),
    guide/advantage_unmixed and guide/gae_unmixed. `mixed` and `k` are per episode; scores too."""
    logs = {"guide/mixed_fraction": distributed.mean(mixed).item()}
    if logs["guide/mixed_fraction"] > 0:  # (a fraction over every rank: each rank takes the same branch)
        restarts = restart_from * (1 - nn.functional.pad(restart_from[:, :-1], (1, 0))) * mixed[:, None]
        logs["guide/mean_k"] = distributed.masked_mean(k.float(), mixed).item()
        logs["guide/score_mixed"] = distributed.masked_mean(scores, mixed).item()
        if values is not None:  # (rloo: no critic)
            logs["guide/explained_variance_restart"] = distributed.explained_variance(values, returns, restarts).item()
    if logs["guide/mixed_fraction"] < 1:
        logs["guide/score_unmixed"] = distributed.masked_mean(scores, 1 - mixed).item()
        if unmixed is not None:
            advantages, raw_advantages, tokens = unmixed
            tokens = tokens * (1 - mixed[:, None])
            logs["guide/advantage_unmixed"] = distributed.masked_mean(advantages, tokens).item()  # the loss's
            logs["guide/gae_unmixed"] = distributed.masked_mean(raw_advantages, tokens).item()  # before normalisation
    return logs
