"""The model summary a fit prints: each top-level part with its parameter count, then the totals."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

SHOWN_COLUMNS = ("Name", "Type", "Params")


class ParameterSummary(ModelSummary):
    """Lightning's model summary without the columns that say nothing here.

    Lightning's table has a FLOPs column and a ``Total FLOPs`` line, which are 0 unless the module defines an
    ``example_input_array`` (none of ours can: a batch is triples plus prompts), and module-mode counts that mostly
    count the frozen text encoder's layers. This one shows each part's parameters and the trainable total.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        """Print the table and the totals (rank 0 only)."""
        rank_zero_info(format_summary(summary_data, total_parameters, trainable_parameters, model_size))


def format_summary(
    summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int, model_size: float
) -> str:
    """The summary as text: a row per part (name, type, parameters), then trainable / total and the size in MB."""
    columns = [(name, values) for name, values in summary_data if name in SHOWN_COLUMNS]
    widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
    rows = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
    for i in range(len(columns[0][1]) if columns else 0):
        rows.append(" | ".join(str(values[i]).ljust(w) for (_, values), w in zip(columns, widths, strict=True)))
    frozen = total_parameters - trainable_parameters
    rows.append(
        f"trainable {get_human_readable_count(trainable_parameters)}, frozen {get_human_readable_count(frozen)}, "
        f"total {get_human_readable_count(total_parameters)} ({get_formatted_model_size(model_size)} MB)"
    )
    return "\n".join(rows)
