"""A torchrun worker for the tests: runs a script's main block in this process (as conftest's
run_script_in_process does), then writes what this rank ended with, for the test to compare the ranks:
its trained weights ({name}_rank{RANK}.safetensors), its prompt order and the prompts it rolled out
(rank{RANK}.json). With SIGINT_RANK0_IN_ITERATION=n, rank 0 alone gets a SIGINT during iteration n
(as from Ctrl-C on one node); with SIGINT_LAUNCHER_IN_ITERATION=n, rank 0 sends it to torchrun during iteration n
(as Ctrl-C in torchrun's terminal: torchrun passes it on to every rank); with SIGKILL_RANK1_IN_ITERATION=n, rank 1
is killed (SIGKILL) during iteration n of the first launch (torchrun --max-restarts relaunches). With SLOW_SAVE=s, a checkpoint takes s
seconds more, and the times of its end (saved.txt) and of each rank's exit (exit_rank{RANK}.txt) are written
(EXIT_TIMES=1: the exits' alone).
With NAN_LOSS_ON_RANK=r, rank r's first loss is nan. With FILE_SIZE_LIMIT_AT_SAVE=n, no file of rank 0's may
grow past n bytes from its first checkpoint on (RLIMIT_FSIZE). With GUIDE_FAILS_ON_RANK=r, rank r's guide fails for good (stopping.StopRun) at its first call. With
REPLAY_EPISODES=file (torch.save'd {helper name: [its results, one per
call]}), each named helper of the script returns its next recorded result, cut to this rank's share of the batch
(tests/test_split.py: the same episodes as a one-process run).

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py ppo.py --task imdb ...
"""

import inspect
import json
import os
import signal
import sys
import time

from safetensors.torch import save_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import Spy, run_script_in_process  # noqa: E402


class Replay(Spy):
    """Stands in for one of the script's helpers: returns the recorded results in turn, this rank's rows only, and
    records the prompts the loop handed it (`prompts`, or the `batch` of examples)."""

    def __init__(self, results, rank, world_size):
        super().__init__()
        self.results, self.rank, self.world_size = list(results), rank, world_size

    def share(self, x):
        n = len(x) // self.world_size
        return x[self.rank * n : (self.rank + 1) * n]

    def wrap(self, function):
        def replayed(*args, **kwargs):
            result = self.results.pop(0)
            return tuple(self.share(x) for x in result) if isinstance(result, tuple) else self.share(result)

        replayed.__signature__ = inspect.signature(function)
        return super().wrap(replayed)


def prompts_of(call):
    return call.prompts if hasattr(call, "prompts") else [e["prompt_ids"] for e in call.batch]


if __name__ == "__main__":
    script, args = sys.argv[1], sys.argv[2:]
    spies = {"rollout": Spy()} if script in ("ppo.py", "ppo_plus_plus.py") else {}
    if os.environ.get("SIGINT_RANK0_IN_ITERATION") and os.environ["RANK"] == "0":
        from test_checkpoints import StopIn

        spies["kl_penalized_rewards"] = StopIn(int(os.environ["SIGINT_RANK0_IN_ITERATION"]), 1, "signal")
    if os.environ.get("SIGINT_LAUNCHER_IN_ITERATION") and os.environ["RANK"] == "0":
        from test_checkpoints import StopIn

        spies["kl_penalized_rewards"] = StopIn(int(os.environ["SIGINT_LAUNCHER_IN_ITERATION"]), 1, "signal",
                                               pid=os.getppid())
    if os.environ.get("SIGKILL_RANK1_IN_ITERATION") and os.environ["RANK"] == "1" and os.environ.get(
            "TORCHELASTIC_RESTART_COUNT", "0") == "0":  # rank 1 dies (an OOM kill), in the first launch only
        from test_checkpoints import StopIn

        spies["kl_penalized_rewards"] = StopIn(int(os.environ["SIGKILL_RANK1_IN_ITERATION"]), 1, "kill")
    if os.environ.get("SLOW_SAVE"):
        from common import checkpoint

        save = checkpoint.save

        def slow_save(*args, **kwargs):
            time.sleep(float(os.environ["SLOW_SAVE"]))
            save(*args, **kwargs)
            with open("saved.txt", "w") as f:
                f.write(repr(time.time()))

        checkpoint.save = slow_save
    if os.environ.get("FILE_SIZE_LIMIT_AT_SAVE") and os.environ["RANK"] == "0":  # from its first checkpoint on, no
        import resource  # file of rank 0 may grow past this many bytes: a full disk, where none can be mounted

        from common import checkpoint

        unlimited_save = checkpoint.save

        def limited_save(*args, **kwargs):
            limit = int(os.environ["FILE_SIZE_LIMIT_AT_SAVE"])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            unlimited_save(*args, **kwargs)

        checkpoint.save = limited_save
    if os.environ.get("GUIDE_FAILS_ON_RANK") == os.environ["RANK"]:  # this rank's guide server is down for good
        from common import guide, stopping

        def failing_load_guide(*args, **kwargs):
            loaded = load_guide(*args, **kwargs)
            loaded.write = lambda *a: (_ for _ in ()).throw(stopping.StopRun("the guide server X failed 6 times"))
            return loaded

        load_guide = guide.load_guide
        spies["load_guide"] = type("Failing", (), {"wrap": staticmethod(lambda function: failing_load_guide)})()
    if os.environ.get("NAN_LOSS_ON_RANK") == os.environ["RANK"]:  # this rank's first loss is nan, the others' finite
        class NanFirstLoss:
            def wrap(self, function):
                calls = []

                def nan_first(*args, **kwargs):
                    loss, stats = function(*args, **kwargs)
                    calls.append(1)
                    return (loss * float("nan") if len(calls) == 1 else loss), stats

                return nan_first

        spies["ppo_loss"] = NanFirstLoss()
    if os.environ.get("REPLAY_EPISODES"):
        import torch

        recorded = torch.load(os.environ["REPLAY_EPISODES"], weights_only=False)
        spies = {name: Replay(results, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
                 for name, results in recorded.items()}
    try:
        namespace = run_script_in_process(script, args, os.getcwd(), spies)
    finally:
        if os.environ.get("SLOW_SAVE") or os.environ.get("EXIT_TIMES"):
            with open(f"exit_rank{os.environ['RANK']}.txt", "w") as f:
                f.write(repr(time.time()))
    rank = os.environ["RANK"]
    for name, model in namespace["trained_models"].items():
        save_model(model, f"{name}_rank{rank}.safetensors")
    with open(f"rank{rank}.json", "w") as f:
        episode_helper = spies.get("rollout") or next((s for s in spies.values() if isinstance(s, Replay)), None)
        json.dump({"prompt_order": namespace["prompt_order"],
                   "rollout_prompts": [prompts_of(call) for call in episode_helper.calls] if episode_helper else []}, f)
