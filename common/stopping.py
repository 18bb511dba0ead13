"""How a run stops cleanly: Ctrl-C or a scheduler's SIGTERM, a black box that fails for good (the
guide's server), a TensorBoard log that cannot be written. Each is noted (RECEIVED) and the loop
ends the iteration in flight, checkpoints and exits with the command that continues the run
(common/run.py calls these at the end of each iteration). Under torchrun: the launcher's command
and its shutdown timeout. And the two checks that stop a run before a nan or inf reaches the weights.
"""

import math
import os
import shlex
import signal
import sys
import threading
import time

import torch

from common import distributed


def check_reward(scores, progress):
    """Before any update: every rank stops with one line when the reward holds a nan or inf on any rank."""
    if distributed.mean(~torch.isfinite(scores)) > 0:
        raise SystemExit(f"error: {progress}: the reward is not finite (nan or inf); stopped before any update")


def check_update(grad_norm, loss, progress, fp16=False):
    """Before an optimizer step: stop with one line when the gradient norm is not finite, naming the loss if any
    rank's loss is not finite (the norm is every rank's after DDP's average, so all ranks decide alike: none is left
    waiting in a collective). Under --fp16 a gradient overflow is not an error: the scaler skips the step."""
    if not torch.isfinite(grad_norm):
        quantity = "loss" if distributed.mean(~torch.isfinite(loss)) > 0 else "gradient"
        if not (fp16 and quantity == "gradient"):
            raise SystemExit(f"error: {progress}: the {quantity} is not finite (nan or inf); stopped before the "
                             "optimizer step")


class StopRun(Exception):
    """A black box the loop depends on (the guide's server) failed for good: the iteration in flight cannot
    finish, so the run stops as on Ctrl-C, at its last completed iteration (the checkpoint of then)."""


# a second signal this soon after the first is the same stop, passed on by a launcher (torchrun forwards the
# Ctrl-C a terminal may also have sent to every process): only a later one stops at once
SAME_STOP_SECONDS = 3.0
RECEIVED = []  # the signals the running loop received (a guide waiting to retry reads it: a stop ends the wait)
ON_STOP = []  # what a black box does on a stop before the process exits (a server guide: drop its queued requests),
# as weak references (a black box that is gone needs nothing)


def let_go():
    """A stop: every black box still there lets go of the work it will not finish (ON_STOP)."""
    for release in [reference() for reference in ON_STOP]:
        if release is not None:
            release()


class Log:
    """TensorBoard's SummaryWriter (same arguments, same methods), whose failures stop the run instead of raising: a
    full disk under runs/ (an OSError, which the writer's thread passes to a later call than the write that failed)
    is noted as a stop (RECEIVED), so the loop ends the iteration, checkpoints and exits with one line, as on
    Ctrl-C (the log is the run's record); later calls do nothing, and close() ends the run with that line."""

    def __init__(self, *args, **kwargs):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.failure = SummaryWriter(*args, **kwargs), None
        print_thread_error = threading.excepthook  # the writer's thread dies on that error: the loop says it once

        def quiet_writer_thread(hook_args):
            if type(hook_args.thread).__name__ != "_AsyncWriterThread":  # (tensorboard's)
                print_thread_error(hook_args)

        threading.excepthook = quiet_writer_thread

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if self.failure is None:
                try:
                    return getattr(self.writer, name)(*args, **kwargs)
                except OSError as e:
                    self.failure = f"an error writing TensorBoard's log {self.writer.log_dir} ({e.strerror or e})"
            if self.failure not in RECEIVED:
                RECEIVED.append(self.failure)
            if name == "close":  # (the run's last call: nothing after it would say so)
                raise SystemExit(f"error: {self.failure}: the run's TensorBoard log is incomplete")

        return call


def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) no longer kill the run: they are noted in the
    returned list, which the loop checks after each step. A second signal stops at once (KeyboardInterrupt),
    unless it comes within SAME_STOP_SECONDS of the first."""
    received, first = RECEIVED, []
    received.clear()

    def handler(signum, frame):
        if first and time.monotonic() - first[0] > SAME_STOP_SECONDS:
            if signum == signal.SIGTERM:  # killed by it, as without the handler: the shell sees 143, not Ctrl-C's 130
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}: stopped at once")
        if first:
            return
        first.append(time.monotonic())
        received.append(signal.Signals(signum).name)
        print(f"\n{received[-1]}: finishing this step, then stopping (send it again to stop at once)", flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return received


def launch_command():
    """How this process was started, as a command to type: `python script ...`, or under torchrun the launcher
    with its own options (read from the parent process where the system shows it; else the process count)."""
    if "LOCAL_WORLD_SIZE" not in os.environ:  # (torchrun sets it)
        return ["python"]
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [arg.decode() for arg in f.read().split(b"\0") if arg]
        start = next(i for i, arg in enumerate(parent) if arg.endswith("torchrun") or arg == "torch.distributed.run")
        return ["torchrun", *parent[start + 1 : len(parent) - parent[::-1].index(sys.argv[0]) - 1]]
    except (OSError, StopIteration, ValueError):
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
        return ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []),
                "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"]]


def launcher_shutdown_timeout():
    """Under torchrun, the seconds it gives the workers after passing a stop on (Ctrl-C in its terminal) before it
    kills them: its --shutdown-timeout, else PET_SHUTDOWN_TIMEOUT / TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30. None
    outside torchrun."""
    launcher = launch_command()
    if launcher[0] != "torchrun":
        return None
    for i, arg in enumerate(launcher):
        name, _, value = arg.partition("=")
        if name in ("--shutdown-timeout", "--shutdown_timeout"):
            return float(value or launcher[i + 1])
    return float(os.environ.get("PET_SHUTDOWN_TIMEOUT") or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)


def check_stop_time(seconds):
    """After the first iteration (`seconds`, with its save where it saved): one line when a stop passed on by
    torchrun could not end an iteration and checkpoint before torchrun kills the workers."""
    timeout = launcher_shutdown_timeout()
    if timeout is not None and seconds > timeout:
        print(f"warning: a stop (Ctrl-C on torchrun) ends the iteration and checkpoints, up to {seconds:.0f} s here, "
              f"but torchrun kills the workers {timeout:g} s after passing it on: start torchrun with "
              f"--shutdown-timeout {math.ceil(2 * seconds)}", flush=True)


def exit_stopped(received, progress, checkpoint_dir, master):
    """A clean stop (every rank calls it): rank 0 prints where the checkpoint is and the command that continues the
    run; every rank exits with the shell's code for the signal any rank received, 128 + its number (130 SIGINT,
    143 SIGTERM), else 1 (a stop for another cause)."""
    names = [name for rank_received in distributed.gather(list(received)) for name in rank_received]
    if master:
        print(stopped_message(received or names, progress, checkpoint_dir), file=sys.stderr, flush=True)
    let_go()
    raise SystemExit(128 + signal.Signals[names[0]] if names and names[0] in ("SIGINT", "SIGTERM") else 1)


def stopped_message(received, progress, checkpoint_dir):
    """What to print on a stop (`received`: the signals, or what stopped the run): where the checkpoint is and the
    command that continues the run."""
    signal_name = received if isinstance(received, str) else received[0] if received else "a signal to another process"
    if not checkpoint_dir:
        return (f"stopped by {signal_name} after {progress}, without a checkpoint (--save-every 0): nothing to "
                "resume from")
    argv, skip = [], False
    for arg in sys.argv:  # the run's own command, with --resume pointing at its checkpoint
        if skip or arg.startswith("--resume="):
            skip = False
            continue
        skip = arg == "--resume"
        if not skip:
            argv.append(arg)
    command = shlex.join([*launch_command(), *argv, "--resume", checkpoint_dir])
    return f"stopped by {signal_name} after {progress}; checkpoint: {checkpoint_dir}\nresume with: {command}"
