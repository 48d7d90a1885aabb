"""Training loss by flow time t: where the flow is still curved (reflow's loss is largest there)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from instaflow_pl.callbacks.images import figure_to_pil, log_image


class LossByT(L.Callback):
    """Collects each sample's reflow loss with its t and logs a histogram of the mean loss per t-bin.

    Args:
        bins: Number of equal t-bins.
        every_n_steps: Draw (and reset) after this many training steps.
    """

    def __init__(self, bins: int = 20, every_n_steps: int = 200):
        self.bins = bins
        self.every_n_steps = every_n_steps
        self._t: list[torch.Tensor] = []
        self._loss: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """Keep this step's (t, loss) pairs; draw every ``every_n_steps``."""
        step = getattr(pl_module, "last_step", None)
        if step is None or step.t is None:
            return
        self._t.append(step.t.detach().float().cpu())
        self._loss.append(step.per_sample.detach().float().cpu())
        if trainer.global_step % self.every_n_steps == 0:
            self._draw(trainer)

    def binned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bin edges (bins + 1), mean loss per bin and sample count per bin, from what was collected."""
        t, loss = torch.cat(self._t), torch.cat(self._loss)
        edges = torch.linspace(0, 1, self.bins + 1)
        index = (t * self.bins).long().clamp(0, self.bins - 1)
        counts = torch.bincount(index, minlength=self.bins).float()
        sums = torch.bincount(index, weights=loss, minlength=self.bins)
        return edges, sums / counts.clamp_min(1), counts

    @rank_zero_only
    def _draw(self, trainer: L.Trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        edges, means, counts = self.binned()
        figure, axis = plt.subplots(figsize=(5, 3), dpi=100)
        axis.bar(edges[:-1].numpy(), means.numpy(), width=1.0 / self.bins, align="edge")
        axis.set(xlabel="t (0 = noise, 1 = data)", ylabel="mean loss", title=f"loss by t ({int(counts.sum())} samples)")
        figure.tight_layout()
        log_image(trainer, "train/loss_by_t", figure_to_pil(figure))
        self._t.clear()
        self._loss.clear()
