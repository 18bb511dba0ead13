"""Checkpoint folders: written whole or not at all, checked before a run writes them, read back exactly.

A checkpoint is one folder: each trained model as `<name>.safetensors` (with LoRA its trainable
tensors only, adapters and value head: the frozen weights are the starting checkpoint's),
`optimizer.pt` (the optimizer's state_dict, read back with torch.load(weights_only=True)) and
`state.json`, the rest of the loop's state as plain JSON (counters, prompt order, KL coefficient,
every RNG state, the flags). Nothing in it is pickled code. common/run.py decides what goes in and
when; this file writes, checks and reads.
"""

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINT_FILES = ("state.json", "optimizer.pt")  # and one <model>.safetensors per trained model


def rng_state(mixing_rng=None, device=None):
    """Every random stream the loop draws from, as JSON: python, numpy, torch's CPU generator, this process's own
    CUDA device's (`device`; never CUDA where the run is on the CPU) and the guided scripts' own mixing stream."""
    numpy_state = np.random.get_state()
    cuda = device is not None and torch.device(device).type == "cuda"
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state(device).tolist() if cuda else None,
        "mixing": mixing_rng.getstate() if mixing_rng is not None else None,
    }


def set_rng_state(state, mixing_rng=None, device=None):
    """rng_state's streams put back. A checkpoint from before 2026-12 holds every visible CUDA device's state (a list
    of them): this process takes its own device's, where the list has it."""
    def python_state(saved):  # JSON made the tuples lists
        return (saved[0], tuple(saved[1]), saved[2])

    random.setstate(python_state(state["python"]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state["cuda"]
    if cuda and device is not None and torch.device(device).type == "cuda":
        if isinstance(cuda[0], list):  # (one state per visible device)
            index = torch.device(device).index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8), device)
    if mixing_rng is not None:
        mixing_rng.setstate(python_state(state["mixing"]))


def trainable_only(model):
    """With LoRA a model's own weights are frozen: only its trainable tensors change, and only they are saved."""
    return not all(p.requires_grad for p in model.parameters())


def save_weights(model, file):
    if trainable_only(model):
        save_file({name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}, file)
    else:
        save_model(model, file)


def load_weights(model, file, device):
    if not trainable_only(model):
        return load_model(model, file, device=device)
    tensors = load_file(file, device=device)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise RuntimeError(f"its tensors are not this run's trainable ones (--lora-r, --lora-target-modules?): "
                           f"{len(set(tensors) - expected)} unexpected, {len(expected - set(tensors))} missing")
    model.load_state_dict(tensors, strict=False)


WRITE_ERRORS = (OSError, SafetensorError)  # what the OS refused: OSError (its strerror: "No space left on device",
# "File too large"; torch.save writes through a Python file, so its failures are these too); safetensors' own error,
# the OS's message inside. Any other error is a bug, not the disk: it is raised as it is.


@contextlib.contextmanager
def writing(what, path):
    """Yields a temporary sibling of the folder `path` to write into; once every write is done, it replaces `path`
    whole (renames: no space needed; the old folder goes aside as `{path}.replaced`, then away; a crash between
    the two renames leaves the old one there). A write that fails (a full disk, no permission) ends the run with one
    line naming it, and leaves nothing half-written where it could be taken for a whole file (`path` as before)."""
    tmp = path.rstrip("/") + ".tmp"  # (check_outputs: nothing there at start)
    try:
        yield tmp
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"error: cannot write {what} {path}: {getattr(e, 'strerror', None) or e}; nothing was "
                         "written there") from None
    if os.path.exists(path):  # the new folder replaces the old whole (its own files, none of the old's)
        replaced = path.rstrip("/") + ".replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(path, replaced)
        os.replace(tmp, path)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(tmp, path)


def nearest_existing(path):
    """`path`, or the first folder on the way up to it that exists (where a write would have to start)."""
    while not os.path.exists(path):
        path = os.path.dirname(path.rstrip("/")) or "."
    return path


def check_writable(path, what):
    """Before training: `path` is, or can be made, a folder this run can write in (the first folder on the way
    that exists takes a file); one line naming `what` otherwise. Nothing is created."""
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise SystemExit(f"error: {what} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise SystemExit(f"error: {what} {path}: cannot write in {existing} ({e.strerror or e})") from None


def save(path, models, optimizer, state, keep=1, since=None):
    """Write the checkpoint to a temporary sibling folder, then put it in place of the previous one: a crash
    while saving leaves the last good checkpoint whole (as `path`, or as `path.old` between the renames). A
    write that fails (a full disk) ends the run with one line, the previous checkpoint kept. keep > 1
    (--keep-checkpoints): the previous one stays beside it as `{path}.iteration_K` (sft.py: `.step_K`), and the
    newest keep - 1 of those are kept. `since`: the iteration (step) a resumed run continued from: this run's kept
    checkpoints after it belong to the future it left, and go."""
    start = time.perf_counter()
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # a save that was cut short (check_dir: only a checkpoint's files)
    if keep > 1 and os.path.isdir(old):  # one cut short between its renames left the previous checkpoint here
        keep_aside(old, path)
    try:
        os.makedirs(tmp)
        for name, model in models.items():
            save_weights(model, os.path.join(tmp, f"{name}.safetensors"))
        with open(os.path.join(tmp, "optimizer.pt"), "wb") as f:  # (a Python file: the OS's error, not iostream's)
            torch.save(optimizer.state_dict(), f)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous one is kept in {path}" if os.path.exists(path) else "there is no previous one"
        raise SystemExit(f"error: cannot write the checkpoint {path} ({getattr(e, 'strerror', None) or e}); {kept}")
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if keep > 1 and os.path.isdir(old):  # the previous checkpoint, named by its own iteration (or step)
        keep_aside(old, path)
    for kept in kept_checkpoints(path):  # resumed from a kept one: this run's kept ones after it are another future's
        if since is not None and int(kept.rpartition("_")[2]) > since and run_of(kept) == state.get("run_name"):
            shutil.rmtree(kept)
            print(f"checkpoint: {kept} removed (the run went on from {since}, not from it)", flush=True)
    if keep > 1:
        for kept in kept_checkpoints(path)[: -(keep - 1)]:  # (the oldest beyond keep - 1)
            shutil.rmtree(kept)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    print(f"checkpoint: {path} ({size / 2**30:.2f} GiB, {time.perf_counter() - start:.1f} s)", flush=True)


def run_of(folder):
    """The run a checkpoint folder belongs to (its state.json's run_name; None if it has none)."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f).get("run_name")
    except (OSError, ValueError):
        return None


def keep_aside(old, path):
    """--keep-checkpoints: the previous checkpoint (in `old`) goes beside `path` as `{path}.iteration_K`."""
    with open(os.path.join(old, "state.json")) as f:
        previous = json.load(f)
    unit = "iteration" if "iteration" in previous else "step"
    kept = f"{path.rstrip('/')}.{unit}_{previous[unit]:06d}"
    shutil.rmtree(kept, ignore_errors=True)  # (this run's own from another future: check_dir refuses another run's)
    os.replace(old, kept)


def check_room(path, models, keep=1):
    """At start, one line when the disk cannot hold keep + 1 checkpoints (--keep-checkpoints; a save writes the new
    one before the previous one goes). A checkpoint's size is estimated as the trained tensors three times (the
    weights, AdamW's two moments, in their own dtype); the run's checkpoints already there (a resume) count as used."""
    size = 3 * sum(p.numel() * p.element_size() for model in models for p in model.parameters() if p.requires_grad)
    existing = nearest_existing(path)
    present = sum(os.path.getsize(os.path.join(folder, name)) for folder in [path, *kept_checkpoints(path)]
                  if os.path.isdir(folder) for name in os.listdir(folder))
    free = shutil.disk_usage(existing).free
    if free < (keep + 1) * size - present:
        print(f"warning: --checkpoint-dir {path}: {free / 2**30:.2f} GiB free, and a checkpoint takes about "
              f"{size / 2**30:.2f} GiB: a save needs room for {keep + 1} (the new one is written before the previous "
              "one goes), so one will fail; free space or choose another folder", flush=True)


def kept_checkpoints(path):
    """The earlier checkpoints --keep-checkpoints keeps beside `path`, oldest first."""
    folder, name = os.path.split(path.rstrip("/"))
    if not os.path.isdir(folder or "."):
        return []
    return sorted(os.path.join(folder, entry) for entry in os.listdir(folder or ".")
                  if re.fullmatch(re.escape(name) + r"\.(iteration|step)_\d{6}", entry))


def is_checkpoint_part(name):
    return name in CHECKPOINT_FILES or name.endswith(".safetensors")


def check_dir(path, run_name):
    """Before training: the checkpoint folder is new, or this run's own (resumed), and can be written; its
    siblings `.tmp` and `.old` (which a save replaces) hold only a checkpoint's files; anything else fails."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: --checkpoint-dir {path} is a file, not a folder; choose another path")
    for sibling in (path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"):
        if os.path.exists(sibling) and not (os.path.isdir(sibling) and all(map(is_checkpoint_part, os.listdir(sibling)))):
            raise SystemExit(f"error: --checkpoint-dir {path}: {sibling} is not a checkpoint, and a save would replace "
                             "it; move it or choose another folder")
    check_writable(path, "--checkpoint-dir")
    for kept in kept_checkpoints(path):  # (a save renames onto them, and drops a resumed run's later ones)
        if run_of(kept) != run_name:
            raise SystemExit(f"error: --checkpoint-dir {path}: {kept} is a checkpoint of run {run_of(kept)}; move it "
                             "or choose another folder")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    state_file = os.path.join(path, "state.json")
    if not os.path.isfile(state_file):
        raise SystemExit(f"error: --checkpoint-dir {path} holds files that are not a checkpoint; choose another folder")
    with open(state_file) as f:
        other_run = json.load(f).get("run_name")
    if other_run != run_name:
        raise SystemExit(f"error: --checkpoint-dir {path} holds the checkpoint of run {other_run}; continue it with "
                         "--resume, or choose another folder")


def check_outputs(run_name, checkpoint_dir, save_path):
    """Before training: every folder the run writes can be written, with one line naming the one that cannot:
    runs/{run_name} (TensorBoard, generations), the checkpoint folder (check_dir), the --save-model folder."""
    check_writable(f"runs/{run_name}", "TensorBoard's folder")
    if checkpoint_dir:
        check_dir(checkpoint_dir, run_name)
    if save_path:
        check_writable(save_path, "--save-path")
        for sibling in (".tmp", ".replaced"):  # (where the model is written, and where the old one goes aside)
            if os.path.exists(save_path.rstrip("/") + sibling):
                raise SystemExit(f"error: --save-path {save_path}: {save_path.rstrip('/')}{sibling} is in the way (an "
                                 "interrupted save's, or another's): move or remove it")


def read_state(args, script, num_rows, same, computed=()):
    """The checkpoint --resume names (None: a fresh start), its state.json checked against this run before any
    model loads: the same script, the same number of training rows (the saved order indexes them) and the flags in
    `same` (the task, and the sizes that set the schedule and the step numbers). Other flags may change on resume
    (evaluation, batch sizes per call...): they are listed; `computed`: fields the script sets later, from the ones
    checked (left out). state["path"] is the folder.

    --resume auto: the checkpoint in --checkpoint-dir, or a fresh start where there is none yet, so one command
    serves a run's first launch and every restart (torchrun --max-restarts); a checkpoint made with other flags is
    refused."""
    path, auto = args.resume, args.resume == "auto"
    if path is None:
        return None
    if auto:
        if not args.checkpoint_dir or not args.save_every:
            raise SystemExit("error: --resume auto needs --checkpoint-dir (the folder its checkpoint is in, or will "
                             "be) and --save-every > 0")
        path = args.checkpoint_dir.rstrip("/")
        if not any(os.path.isfile(os.path.join(folder, "state.json")) for folder in (path, path + ".old")):
            print(f"--resume auto: no checkpoint in {path} yet: a fresh start", flush=True)
            return None
    if not os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path + ".old", "state.json")):
        print(f"{path}: the last save was cut short; resuming from the checkpoint before it, {path}.old")
        path += ".old"
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: --resume {path}: not a checkpoint folder (no state.json)") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --resume {path}: state.json is damaged ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [key for key in ("script", "args", "num_rows") if key not in state]
    if missing:
        raise SystemExit(f"error: --resume {path}: state.json is damaged (no {', '.join(missing)})")
    if state.get("script") != script:
        raise SystemExit(f"error: --resume {path}: a checkpoint of {state.get('script')}, not of {script}")
    for name in same:
        if state["args"].get(name) != getattr(args, name):
            raise SystemExit(f"error: --resume {path}: the checkpoint has --{name.replace('_', '-')} "
                             f"{state['args'].get(name)}, this run {getattr(args, name)}")
    if state["num_rows"] != num_rows:
        raise SystemExit(f"error: --resume {path}: the checkpoint's run had {state['num_rows']} training rows, this "
                         f"run has {num_rows} (another dataset)")
    changed = [f"--{name.replace('_', '-')} {value} -> {getattr(args, name)}" for name, value in state["args"].items()
               if name not in ("resume", "checkpoint_dir", *computed)  # (as JSON: a tuple flag was saved as a list)
               and json.loads(json.dumps(getattr(args, name, value))) != value]
    if changed and auto:
        raise SystemExit(f"error: --resume auto: the checkpoint in {path} was made with other flags "
                         f"({', '.join(changed)}): give its command, or --resume {path} to continue with these")
    if changed:
        print(f"resuming with flags changed from the checkpoint's: {', '.join(changed)}")
    state["path"] = path
    return state


def load(state, models, optimizer, scaler, device):
    """Load the models' weights, the optimizer's state and --fp16's loss scale from the checkpoint read by
    read_state."""
    path = state["path"]
    for name, model in models.items():
        file = os.path.join(path, f"{name}.safetensors")
        if not os.path.isfile(file):
            raise SystemExit(f"error: --resume {path}: {name}.safetensors is missing")
        try:
            load_weights(model, file, str(device))
        except SafetensorError as e:  # cut short, overwritten...
            raise SystemExit(f"error: --resume {path}: {name}.safetensors is damaged ({str(e)[:200]})") from None
        except (RuntimeError, OSError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else "")
            raise SystemExit(f"error: --resume {path}: its {name} does not fit this run's model ({detail[:200]})")
    file = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(file):
        raise SystemExit(f"error: --resume {path}: optimizer.pt is missing")
    try:
        optimizer_state = torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only: tensors and plain containers, never code
        raise SystemExit(f"error: --resume {path}: optimizer.pt holds more than tensors, not loaded "
                         f"({str(e).strip().splitlines()[0][:200]})")
    except (RuntimeError, EOFError, OSError) as e:  # cut short, overwritten...
        raise SystemExit(f"error: --resume {path}: optimizer.pt is damaged ({str(e).strip()[:200]})") from None
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --resume {path}: optimizer.pt does not fit this run's optimizer ({str(e)[:200]})")
    if state.get("scaler"):  # (saved with --fp16)
        scaler.load_state_dict(state["scaler"])
    step = state.get("iteration", state.get("step"))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"resumed {state['run_name']} at {'iteration' if 'iteration' in state else 'step'} {step} from {path}")
