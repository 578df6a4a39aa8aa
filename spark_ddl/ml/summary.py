"""What a fit reports: per-epoch metrics and the run's facts, as a dict with helpers."""

from __future__ import annotations

from typing import Any

from spark_ddl.common.batch_format import POSITIONAL_KEY


class TrainingSummary(dict):
    """The training summary of a TorchModel (a plain dict underneath, saved as JSON).

    Keys include ``history`` (one record per epoch: train_loss, samples, seconds,
    samples_per_s, lr and, with validation, val_loss/val_accuracy), ``world_size``, ``sync``,
    ``seconds``, ``device``, ``shard_sizes`` and ``attempts``.
    """

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.get("history", []))

    def to_pandas(self):
        """One row per epoch, with the run's world size and strategy as columns."""
        import pandas as pd

        frame = pd.DataFrame(self.history)
        frame["world_size"] = self.get("world_size")
        frame["sync"] = self.get("sync")
        frame["attempts"] = len(self.get("attempts", [])) or 1
        return frame

    def plot(self, path: str) -> str:
        """Write a PNG of the loss curves (and validation accuracy when there is one) to ``path``.

        Needs matplotlib (``pip install spark_ddl[plot]``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("plotting needs matplotlib: pip install 'spark_ddl[plot]'") from exc
        history = self.history
        if not history:
            raise ValueError("this summary has no per-epoch history to plot")
        epochs = [h["epoch"] for h in history]
        has_accuracy = any("val_accuracy" in h for h in history)
        figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 6, 4),
                                    squeeze=False)
        loss_axes = axes[0][0]
        loss_axes.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
        if any("val_loss" in h for h in history):
            loss_axes.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="validation loss")
        loss_axes.set_xlabel("epoch")
        loss_axes.set_ylabel("loss")
        loss_axes.set_yscale("log")
        loss_axes.legend()
        loss_axes.grid(alpha=0.3)
        if has_accuracy:
            accuracy_axes = axes[0][1]
            accuracy_axes.plot(epochs, [h.get("val_accuracy") for h in history], marker="o", color="C2")
            accuracy_axes.set_xlabel("epoch")
            accuracy_axes.set_ylabel("validation accuracy")
            accuracy_axes.grid(alpha=0.3)
        figure.suptitle(f"{self.get('sync', '?')} on {self.get('world_size', '?')} agents, "
                        f"{self.get('seconds', 0):.1f} s")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


# What summaries held before the agents' typed report (spark_ddl.common.wire.AgentReport), saved with
# models up to 2026-12-04: the model's input facts and the driver's control keys.
OLD_FORMAT_KEYS = ("feature_dim", "row_shapes", "batch_spec", "paused_after_epoch", "result_format")


def old_format_row_shapes(summary: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """The old-format fallback, for a model saved before its metadata held ``row_shapes``: its
    row shapes as its summary recorded them (``row_shapes``, or only ``feature_dim``: the
    one-input shorthand's width), and the summary without the keys it no longer holds."""
    dim = summary.get("feature_dim")
    shapes = summary.get("row_shapes") or ({POSITIONAL_KEY: [dim]} if dim is not None else {})
    return shapes, {key: value for key, value in summary.items() if key not in OLD_FORMAT_KEYS}
