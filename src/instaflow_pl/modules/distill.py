"""DistillModule: a one-step (or k-step) student ``X1_hat = X0 + v(X0, 0 | T)`` matched to the teacher's X1."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.modules.base import FlowModule, StepOutput
from instaflow_pl.modules.losses import Distance, LPIPSDistance
from instaflow_pl.solver import LatentODE
from instaflow_pl.velocity import TextCondition


class DistillModule(FlowModule):
    """Distils a k-rectified flow's (X0, X1) pairs into a student that needs ``student_steps`` Euler steps (1).

    The student is ``X1_hat = ODE_euler[v](X0 | T)`` on a fixed grid of ``student_steps`` steps through the
    LatentODE; with one step that is ``X0 + v(X0, t=0 | T)`` (UNet timestep 1000). It is initialised from the k-RF.

    Args:
        base_model: Diffusers-format folder of the k-RF the student starts from (see FlowModule).
        distance: Weights of the distances summed into the loss: ``l2``, ``huber`` (pseudo-Huber) and ``lpips``
            (on VAE-decoded images, the paper's choice), e.g. ``{"l2": 1.0}`` or ``{"lpips": 1.0, "l2": 0.1}``.
        huber_c: The pseudo-Huber constant c.
        lpips_net: LPIPS backbone, ``vgg`` or ``alex``.
        lpips_pretrained: Use the backbone's ImageNet weights from ``$TORCH_HOME/hub/checkpoints`` (false: random
            weights, for tests only).
        lpips_checkpointing: Gradient checkpointing of the VAE decoder on the student's LPIPS path (same loss,
            far less memory at 512 px; the decoder runs twice in the backward pass).
        lpips_dtype: ``fp32`` or ``bf16``: the VAE decode and LPIPS net's dtype (bf16: half the memory, loss
            equal up to bf16 rounding).
        lpips_resize: Resize decoded images to this side before LPIPS (e.g. 224, as 2-rectified flow++ does;
            changes the loss); null: the decoded size.
        student_steps: Euler steps of the student (1 = InstaFlow's one-step generator).
        prompt_dropout: Probability of the null prompt (0: the student learns the guided teacher's outputs).
        val_steps: Euler step counts of the validation samples.
        windows: Only 1: piecewise (windowed) reflow is an option of ReflowModule, not of distillation.
        velocity: The velocity network (default: the network of ``base_model``, a UNet or a transformer).
        **kwargs: The shared training options of FlowModule (optimizer, schedule, EMA, freezing, validation).
    """

    def __init__(
        self,
        base_model: str,
        velocity: nn.Module | None = None,
        distance: dict[str, float] | None = None,
        huber_c: float = 0.001,
        lpips_net: str = "vgg",
        lpips_pretrained: bool = True,
        lpips_checkpointing: bool = False,
        lpips_dtype: str = "fp32",
        lpips_resize: int | None = None,
        student_steps: int = 1,
        prompt_dropout: float = 0.0,
        val_steps: Sequence[int] = (1, 2, 4),
        windows: int = 1,
        **kwargs,
    ):
        if windows != 1:
            raise UserError(
                f"windows={windows} is piecewise reflow, an option of ReflowModule; DistillModule distils pairs into a "
                "student of student_steps Euler steps (use class_path: instaflow_pl.modules.ReflowModule)"
            )
        if student_steps < 1:
            raise UserError(f"student_steps must be >= 1, got {student_steps}")
        super().__init__(base_model, velocity, prompt_dropout=prompt_dropout, val_steps=val_steps, **kwargs)
        weights = dict(distance or {"l2": 1.0})
        lpips = None
        if "lpips" in weights:
            from instaflow_pl.model_folder import ModelFolder

            vae = ModelFolder.open(base_model).load_vae()
            lpips = LPIPSDistance(vae, lpips_net, lpips_pretrained, lpips_checkpointing, lpips_dtype, lpips_resize)
        self.distance = Distance(weights, huber_c, lpips)
        self.student = LatentODE("euler", student_steps)

    def compute_loss(self, batch: TripleBatch, cond: TextCondition) -> StepOutput:
        """Distance between the student's output and the teacher's X1."""
        prediction = self.student.solve(self.velocity, batch.x0, cond, enable_grad=True).x
        terms = self.distance(prediction, batch.x1)
        total = terms.pop("total")
        logged = {f"distance_{name}": value.mean().detach() for name, value in terms.items()}
        return StepOutput(total.mean(), total.detach(), None, logged)
