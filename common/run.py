"""The run around the loop: its flags, its folders, its checkpoints, its clean stop, its saved model.

A script asks a Run five things, the same in every script (sft.py counts steps where the RL
scripts count iterations), and nothing between the algorithm's steps:

    run = Run(args, __file__, len(train_rows), device, same=...)  # checks, resume state, run name, TensorBoard
    kl_coef, ... = run.resume(models, optimizer, scaler, kl_coef=...)  # the checkpoint's state, or these
    for iteration in run.iterations(args.num_iterations):          # from the first (or resumed) iteration
        ...                                                         # the algorithm
        run.end_iteration(iteration, kl_coef=kl_coef, ...)          # checkpoint when due; a clean stop
    run.finish(policy, tokenizer, ...)                              # --save-model, TensorBoard closed

The guided scripts wrap their rollout in `with run.stop_on_failure():` (a guide that stays down);
logging goes to `run.writer` (TensorBoard, rank 0's) and `run.log_eval`. A checkpoint holds the
trained models, the optimizer, --fp16's loss scale, every rank's random streams and the loop's own
state: the names given to resume, given again (the same names) to end_iteration. A fork that adds a
variable the loop carries from one iteration to the next adds it to both.
"""

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from common import checkpoint, distributed, stopping, tasks


@dataclass
class RunArgs:
    """The run's infrastructure, shared by every script: sft.py's flags (the RL scripts': RLRunArgs)."""

    exp_name: str = field(default_factory=lambda: os.path.basename(sys.argv[0]).removesuffix(".py"))
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = True
    """use CUDA when it is available (otherwise the CPU)"""
    bf16: bool = False
    """bfloat16 autocast for forward passes (weights stay fp32; the loss is computed in fp32)"""
    fp16: bool = False
    """float16 autocast with a gradient scaler, for GPUs without bfloat16 (T4, V100); weights stay fp32"""
    track: bool = False
    """log to Weights and Biases as well as TensorBoard"""
    wandb_project_name: str = "rlgf"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    save_model: bool = False
    """save the fine-tuned model (save_pretrained folder) at the end"""
    save_path: Optional[str] = None
    """where --save-model writes (default: models/{run_name}); an existing folder must hold a previous model"""
    save_every: int = 0
    """write a checkpoint every this many steps, at the end, and on Ctrl-C or SIGTERM (0 = never)"""
    checkpoint_dir: Optional[str] = None
    """the checkpoint folder, the latest replacing the last (default: checkpoints/{run_name}; resumed: --resume)"""
    keep_checkpoints: int = 1
    """checkpoints kept: the newest in --checkpoint-dir and the N - 1 before it beside it, as {dir}.step_K"""
    resume: Optional[str] = None
    """a checkpoint folder: continue its run exactly, with the same flags, TensorBoard folder and step numbers; auto:
    --checkpoint-dir's checkpoint, or a fresh start where there is none (one command for every torchrun restart)"""

    def __post_init__(self):  # (checked as the flags are read, before anything loads)
        if self.bf16 and self.fp16:
            raise SystemExit("error: --bf16 and --fp16: choose one")
        tasks.check_ranges(self, positive=("keep_checkpoints",), non_negative=("save_every",))


@dataclass
class RLRunArgs(RunArgs):
    """The RL scripts' infrastructure: RunArgs (counting iterations, saving the policy), several processes, and the
    memory savers (common/memory.py)."""

    bf16: bool = False
    """bfloat16 autocast for forward passes; trained weights stay fp32, frozen ones are bfloat16 (log-probs in fp32)"""
    save_model: bool = False
    """save the trained policy (save_pretrained folder) at the end"""
    save_every: int = 0
    """write a checkpoint every this many iterations, at the end, and on Ctrl-C or SIGTERM (0 = never)"""
    keep_checkpoints: int = 1
    """checkpoints kept: the newest in --checkpoint-dir and the N - 1 before it beside it, as {dir}.iteration_K"""
    process_group_timeout: float = 180.0
    """torchrun: minutes a process waits in a collective for the others (rank 0 alone evaluates and checkpoints
    meanwhile); lower it (e.g. 15) to learn of a dead rank sooner, raise it for evaluations longer than 3 h"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass instead of keeping them (less memory, more time)"""
    lora_r: int = 0
    """LoRA rank (peft): policy and critic train low-rank adapters on frozen weights, which are also pi_ref; 0: off"""
    lora_alpha: int = 64
    """LoRA alpha: the adapters add alpha / r * B A to each weight (tril: r 8, alpha 64)"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the layers that get adapters: module names (e.g. q_proj v_proj), or all-linear (every one but the LM head)"""

    def __post_init__(self):
        super().__post_init__()
        tasks.check_ranges(self, positive=("process_group_timeout", "lora_alpha"), non_negative=("lora_r",))


class Run:
    """One training run's lifecycle. Rank 0 (`master`) writes TensorBoard, checkpoints and the saved model; every
    rank takes part in the collective steps (a stop anywhere stops every rank at the same iteration)."""

    def __init__(self, args, script, num_rows, device, same, computed=(), unit="iteration", what="policy"):
        """Before any model loads: --save-path, the checkpoint --resume names (checked against these flags: `same`
        must not change, `computed` are set from them), the run's name (a resumed run keeps its own), every folder
        it writes, wandb, and TensorBoard's writer (resumed: what the run logged after its checkpoint is hidden)."""
        self.args, self.script, self.num_rows, self.device = args, os.path.basename(script), num_rows, device
        self.unit, self.what = unit, what
        self.master = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        tasks.check_save_path(args.save_path if args.save_model else None, args.model_name_or_path)
        self.resumed = checkpoint.read_state(args, self.script, num_rows, same=same, computed=computed)
        self.name = (self.resumed["run_name"] if self.resumed
                     else f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
        self.checkpoint_dir = ((args.checkpoint_dir or args.resume or f"checkpoints/{self.name}") if args.save_every
                               else None)
        self.save_path = (args.save_path or f"models/{self.name}") if args.save_model else None
        checkpoint.check_outputs(self.name, self.checkpoint_dir, self.save_path)  # every folder it writes
        if args.track and self.master:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=self.name, id=self.name, resume="allow", save_code=True)
        self.writer, self.failures = None, []
        if self.master:  # TensorBoard's step is the episode count (sft.py: examples), resumed where it stopped
            resumed_step = (self.resumed.get("global_episodes", self.resumed.get("step", 0) * args.batch_size)
                            if self.resumed else None)
            self.writer = stopping.Log(f"runs/{self.name}", purge_step=resumed_step + 1 if self.resumed else None)
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s"
                                 % "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items()))

    def log_eval(self, iteration, step, result, generations):
        """An evaluation's metrics to TensorBoard (eval/<name> at `step`, the episodes), every generation to
        runs/{run_name}/generations/, the first --num-sample-generations as a text table, and one printed line."""
        for name, value in result.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        file = f"{self.unit}_{iteration:04d}" if self.unit == "iteration" else f"{self.unit}_{iteration:06d}"
        try:  # (rank 0 alone writes: a failure here is a stop every rank makes at this iteration's end)
            tasks.write_jsonl(f"runs/{self.name}/generations/{file}.jsonl", generations)
        except OSError as e:  # (before the loop starts, kept for it: iterations() starts a fresh list of stops)
            self.failures.append(f"an error writing runs/{self.name}/generations/ ({e.strerror or e})")
            stopping.RECEIVED.append(self.failures[-1])
        self.writer.add_text("eval/samples", tasks.samples_table(generations[: self.args.num_sample_generations]), step)
        print(f"eval @ {self.unit} {iteration}: " + ", ".join(f"{name} {value:.4f}" for name, value in result.items()))

    def resume(self, models, optimizer, scaler, mixing_rng=None, **loop_state):
        """The state the loop starts from (nanoGPT's init_from="resume"): resumed, the models' weights, the optimizer,
        the loss scale and this rank's random streams (`mixing_rng`: a guided script's own) are the checkpoint's,
        and the values of `loop_state`'s names are returned from it; otherwise `loop_state`'s values, in its order.
        These are what a checkpoint saves (end_iteration). Also: one line if the disk cannot hold the checkpoints."""
        self.models, self.optimizer, self.scaler, self.mixing_rng = models, optimizer, scaler, mixing_rng
        reserved = {"script", "run_name", "args", "num_rows", "rng", "scaler", self.unit} & set(loop_state)
        if reserved:
            raise ValueError(f"run.resume: {', '.join(sorted(reserved))}: a checkpoint's own names, not the loop's")
        if self.checkpoint_dir and self.master:
            checkpoint.check_room(self.checkpoint_dir, models.values(), self.args.keep_checkpoints)
        self.first, self.since = 1, None
        if self.resumed:
            checkpoint.load(self.resumed, models, optimizer, scaler, self.device)
            loop_state = {name: self.resumed[name] for name in loop_state}
            rng = self.resumed["rng"]  # every rank's (sft.py's before 2026-12: its one, not in a list)
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            checkpoint.set_rng_state(rng[rank] if isinstance(rng, list) else rng, mixing_rng, self.device)
            self.since = self.resumed[self.unit]  # (its kept checkpoints after this one: the future it left)
            self.first = self.since + 1
        self.completed = (self.first - 1, self.copy(loop_state))  # the iteration a failure stops at
        return tuple(loop_state.values())

    @staticmethod
    def copy(loop_state):
        return {name: list(value) if isinstance(value, list) else value for name, value in loop_state.items()}

    def iterations(self, total):
        """The iterations to run, up to `total`: from 1, or from the one after the checkpoint's. From here on Ctrl-C
        and SIGTERM end the iteration in flight, checkpoint and exit (end_iteration); a second one stops at once."""
        self.total, self.stop = total, stopping.stop_on_signals()
        self.stop += self.failures  # (a write that failed before the loop, at the first evaluation)
        for iteration in range(self.first, self.total + 1):
            self.iteration_start = time.perf_counter()
            self.random_state = checkpoint.rng_state(self.mixing_rng, self.device)  # where the iteration starts from
            yield iteration

    def end_iteration(self, iteration, **loop_state):
        """After the iteration's logging and evaluation: the checkpoint, every --save-every iterations, at the last
        and on a stop (a signal or a failed log on any rank); after a stop, exit with the command that continues the
        run. After the first iteration, one line if torchrun would kill a stopping run before it checkpoints."""
        if loop_state.keys() != self.completed[1].keys():  # (what is saved is what resume restores)
            raise ValueError(f"run.end_iteration: the loop's state is {', '.join(self.completed[1])} (run.resume's), "
                             f"not {', '.join(loop_state)}")
        self.completed = (iteration, self.copy(loop_state))
        stop_now = distributed.mean(torch.tensor([len(self.stop)], device=self.device)) > 0  # on any rank
        if self.checkpoint_dir and (iteration % self.args.save_every == 0 or iteration == self.total or stop_now):
            self.save(iteration, checkpoint.rng_state(self.mixing_rng, self.device), loop_state)
        if stop_now and iteration < self.total:  # (stopped in the last one: the run ends as usual)
            stopping.exit_stopped(self.stop, f"{self.unit} {iteration}/{self.total}", self.checkpoint_dir, self.master)
        if iteration == self.first and self.master:
            stopping.check_stop_time(time.perf_counter() - self.iteration_start)

    @contextlib.contextmanager
    def stop_on_failure(self):
        """Around a step that calls a black box which can fail for good (the guide's server raises StopRun): the
        iteration cannot finish, so every rank stops as on Ctrl-C at the last completed iteration, whose checkpoint
        is written, under --save-every 0 too (in checkpoints/{run_name}; --no-guide-failure-checkpoint: not)."""
        failure = None
        try:
            yield
        except stopping.StopRun as e:
            failure = str(e)
        failures = [f for f in distributed.gather(failure) if f]  # on any rank
        if failures:
            iteration, loop_state = self.completed
            checkpoint_dir = self.checkpoint_dir or (
                f"checkpoints/{self.name}" if getattr(self.args, "guide_failure_checkpoint", False) else None)
            if checkpoint_dir:  # the weights are still the last completed iteration's: saved with its random state
                self.checkpoint_dir = checkpoint_dir
                self.save(iteration, self.random_state, loop_state)
            stopping.let_go()
            raise SystemExit(f"error: {failures[0]}\n" + stopping.stopped_message(
                "that error", f"{self.unit} {iteration}/{self.total}", checkpoint_dir) if self.master else 1)

    def save(self, iteration, random_state, loop_state):
        """The checkpoint of `iteration`: rank 0 writes it, with every rank's random streams; no rank leaves before
        it is complete, and a write that fails (a full disk) stops every rank."""
        random_states = distributed.gather(random_state)
        with distributed.together():
            if self.master:
                self.writer.flush()  # TensorBoard up to this iteration is on disk with it
                checkpoint.save(self.checkpoint_dir, self.models, self.optimizer, dict(
                    script=self.script, run_name=self.name, args=asdict(self.args), **{self.unit: iteration},
                    **loop_state, num_rows=self.num_rows, rng=random_states, scaler=self.scaler.state_dict()),
                    keep=self.args.keep_checkpoints, since=self.since)
        self.since = None  # (only a resumed run's first save finds the future it left beside it)

    def finish(self, model, tokenizer, generation_config, config=None):
        """After the loop: --save-model writes the model (LoRA: its adapters merged into the weights in float32, a
        plain float32 checkpoint of the model's own class, twice a bfloat16 one) with the checkpoint's own generation
        settings and `config` (its dropout) put back; a full disk ends the run with one line and nothing
        half-written. TensorBoard is closed."""
        if self.save_path and self.master:
            if getattr(self.args, "lora_r", 0):  # merged in fp32 (bf16 weights round most of a small delta away)
                model = model.to(device="cpu", dtype=torch.float32).merge_and_unload()  # on the host: saved in fp32
            model.generation_config = generation_config
            model.config.update(config or {})
            with checkpoint.writing(f"the {self.what} to", self.save_path) as folder:
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            print(f"saved the {self.what} to {self.save_path}")
        if self.master:
            self.writer.close()
        distributed.cleanup()
