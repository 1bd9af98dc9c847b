"""Training logs: per-step CSV, end-of-epoch summary table, loss-curve PNG, optional TensorBoard."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from hairdiff_core.fileio import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

STEP_COLUMNS = ("step", "epoch", "total", "mse", "shape", "lr", "sigma")
EPOCH_COLUMNS = ("epoch", "total", "mse", "shape")


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def format_epoch_table(rows: list[dict]) -> str:
    """Markdown table (epoch, total, mse, shape), the layout the method was published with."""
    lines = ["| epoch | total | mse | shape |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {int(r['epoch'])} | {r['total']:.4f} | {r['mse']:.4f} | {r['shape']:.4f} |")
    return "\n".join(lines)


class TrainingLogs:
    """Owned by the main process. ``start_step`` > 0 (a resume) drops rows the resumed run
    will write again."""

    def __init__(
        self, output: Path, start_step: int = 0, epoch_rows: list[dict] | None = None, tensorboard: bool = True
    ):
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.steps_path = self.output / "log.csv"
        self.epochs_path = self.output / "epochs.csv"
        self.summary_path = self.output / "epoch_summary.md"
        self.curve_path = self.output / "loss_curve.png"
        self.epoch_rows = list(epoch_rows or [])
        self.rows: list[dict] = []
        if start_step > 0 and self.steps_path.is_file():
            with open(self.steps_path, newline="", encoding="utf-8") as f:
                self.rows = [
                    {k: float(v) for k, v in r.items()}
                    for r in csv.DictReader(f)
                    if int(float(r["step"])) <= start_step
                ]
        self._rewrite_steps()
        self._write_epochs()
        self._file = open(self.steps_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=STEP_COLUMNS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(self.output / "tensorboard"), purge_step=start_step + 1 if start_step else None
                )
            except ImportError:
                logger.debug("tensorboard is not installed; skipping TensorBoard logs")

    def _rewrite_steps(self) -> None:
        with atomic_write(self.steps_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow(self._fmt(r))

    @staticmethod
    def _fmt(row: dict) -> dict:
        return {k: (int(row[k]) if k in ("step", "epoch") else f"{row[k]:.6g}") for k in STEP_COLUMNS}

    def log_step(self, row: dict) -> None:
        self.rows.append(row)
        self._csv.writerow(self._fmt(row))
        self._file.flush()
        if self.tb is not None:
            for k in ("total", "mse", "shape", "lr", "sigma"):
                self.tb.add_scalar(f"train/{k}", row[k], int(row["step"]))

    def log_epoch(self, row: dict) -> None:
        self.epoch_rows.append(row)
        self._write_epochs()
        logger.info("epoch %d done:\n%s", int(row["epoch"]), format_epoch_table(self.epoch_rows))
        if self.tb is not None:
            for k in ("total", "mse", "shape"):
                self.tb.add_scalar(f"epoch/{k}", row[k], int(row["epoch"]))
        self.plot()

    def _write_epochs(self) -> None:
        lines = [",".join(EPOCH_COLUMNS)]
        lines += [f"{int(r['epoch'])},{r['total']:.6g},{r['mse']:.6g},{r['shape']:.6g}" for r in self.epoch_rows]
        _atomic_text(self.epochs_path, "\n".join(lines) + "\n")
        _atomic_text(self.summary_path, format_epoch_table(self.epoch_rows) + "\n")

    def plot(self) -> Path | None:
        if not self.rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib is not installed; no loss curve (pip install 'hairdiff[train]')")
            return None
        steps = [r["step"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key in ("total", "mse", "shape"):
            ax.plot(steps, [r[key] for r in self.rows], label=key, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if all(r[k] > 0 for r in self.rows for k in ("total", "mse")):
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            with atomic_write(self.curve_path) as tmp:
                fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)
        return self.curve_path

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
