"""Metric output: ``metrics.jsonl``, TensorBoard event files and a console progress bar.

Only process 0 writes; the other processes get disabled writers.
"""

from __future__ import annotations

import json
import os

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends ``{'step', 'split', ...}`` lines to ``workdir/metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        import tensorflow as tf

        self._file = open(os.path.join(workdir, METRICS_FILE), "a")
        self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        import tensorflow as tf

        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        with self._summary.as_default(step=int(step)):
            for key, value in values.items():
                tf.summary.scalar(f"{split}/{key}", float(value))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._summary.close()
            self.enabled = False


def _plain(value):
    return int(value) if isinstance(value, int) else float(value)


class ProgressBar:
    """tqdm bar over training steps showing images/s, loss, top-1 and the ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not enabled)
        self._last = start_step

    def update(self, step: int, metrics: dict) -> None:
        self._bar.update(step - self._last)
        self._last = step
        self._bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            top1=f"{100 * metrics['top1']:.1f}%",
            img_s=f"{metrics['images_per_sec']:.0f}",
        )

    def write(self, text: str) -> None:
        self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
