"""Memory savers for large models, shared by the training scripts.

Gradient checkpointing: each transformer layer recomputes its activations in the backward pass
instead of keeping them from the forward pass (activation memory of one layer instead of all, for
about a third more compute in the update).

LoRA (Hu et al. 2021, through peft): the model's own weights are frozen and low-rank adapters
W + (alpha / r) B A train instead; B starts at 0, so the adapted model starts as the model itself.
No gradient or optimizer state for the frozen weights, and the policy's frozen weights double as
pi_ref (the policy with its adapters switched off).
"""

from torch import nn
from transformers import AutoConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D


def dropout_probabilities(model_name_or_path):
    """The checkpoint's dropout probabilities (every *dropout* / *pdrop* number of its config). The trained models
    load with them at 0 (from_pretrained(**dict.fromkeys(them, 0.0)): modules copy a probability when built, so
    changing the config afterwards does nothing): the training pass then reproduces the rollout's log-probs in
    every architecture, also those whose layers drop out by their own training flag (OPT, XGLM, BioGPT,
    Falcon), which gradient checkpointing sets. config.update(them) puts them back before saving."""
    config = AutoConfig.from_pretrained(model_name_or_path).to_dict()
    return {name: value for name, value in config.items() if ("dropout" in name or "pdrop" in name)
            and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0}


def enable_gradient_checkpointing(models):
    """Arm checkpointing in every transformer of `models` (a critic's is its backbone)."""
    for model in models:
        backbone = getattr(model, "backbone", model)
        # transformers 5.x renamed gradient_checkpointing_enable; the old name warns in newer releases
        enable = getattr(backbone, "activation_checkpointing_enable", backbone.gradient_checkpointing_enable)
        enable({"use_reentrant": False})


def set_gradient_checkpointing(models, on):
    """transformers recomputes a layer only while the layer is in training mode. That flag alone is set,
    and only for the update: generation keeps its KV cache, and dropout stays off (the trained models have
    no dropout at all: dropout_probabilities)."""
    for model in models:
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.training = on


def add_lora(model, args, task_type):
    """Freeze `model` and give it LoRA adapters (--lora-r, --lora-alpha, --lora-target-modules). peft is
    imported here only: without --lora-r the scripts never need it."""
    import peft

    targets = list(args.lora_target_modules)
    transposed = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2's layers keep W as (in, out)
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, task_type=task_type,
                             target_modules=targets[0] if targets == ["all-linear"] else targets,
                             fan_in_fan_out=transposed)  # (else peft corrects it with a warning per model)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a module name this model does not have
        raise SystemExit(f"error: --lora-target-modules {' '.join(targets)}: {str(e).splitlines()[0][:300]}")


class AdaptersOff(nn.Module):
    """pi_ref under LoRA: the policy's own frozen weights, its adapters switched off for each call."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)
