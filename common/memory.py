"""Memory savers for large models, shared by the training scripts.

Gradient checkpointing: each transformer layer recomputes its activations in the backward pass
instead of keeping them from the forward pass (activation memory of one layer instead of all, for
about a third more compute in the update).
"""

from transformers.modeling_layers import GradientCheckpointingLayer


def enable_gradient_checkpointing(models):
    """Arm checkpointing in every transformer of `models` (a critic's is its backbone)."""
    for model in models:
        backbone = getattr(model, "backbone", model)
        # transformers 5.x renamed gradient_checkpointing_enable; the old name warns in newer releases
        enable = getattr(backbone, "activation_checkpointing_enable", backbone.gradient_checkpointing_enable)
        enable({"use_reentrant": False})


def set_gradient_checkpointing(models, on):
    """transformers recomputes a layer only while the layer is in training mode. That flag alone is set,
    and only for the update: dropout stays off (the ratio's log-probs stay the rollout's) and generation
    keeps its KV cache."""
    for model in models:
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.training = on
