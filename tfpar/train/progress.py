"""What a training run measures as it goes: throughput, MFU and the loss curve.

`Throughput` times every training batch (from the batch's start to its
end, so evaluation and checkpointing are not counted) and leaves out the
first batch of each `fit` call, which traces and compiles the step. At
each epoch end it adds `tokens_per_second` and `mfu` to the logs, so the
progress bar, TensorBoard and the summary all show the same numbers.

MFU (model FLOPs utilization) is the model's training FLOPs per second
(`GPTConfig.training_flops_per_token` x tokens/s) over the peak FLOP/s of
the accelerators the job runs on (`tfpar.devices.peak_flops`).
"""

from __future__ import annotations

import time

import keras


class Throughput(keras.callbacks.Callback):
    """Tokens/s and MFU of the training batches; the per-step training loss.

    Args:
      tokens_per_batch: tokens in one global batch (batch x sequence length).
      flops_per_token: model training FLOPs per token.
      peak_flops: summed peak FLOP/s of the job's accelerators.
      micro_steps: Keras batches per optimizer step (gradient accumulation).
      first_step: the optimizer step the run starts from (after a resume).
    """

    def __init__(self, tokens_per_batch: int, flops_per_token: float, peak_flops: float,
                 micro_steps: int = 1, first_step: int = 0):
        super().__init__()
        self.tokens_per_batch = tokens_per_batch
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.micro_steps = micro_steps
        self.micro_step = first_step * micro_steps
        self.losses: list[tuple[int, float]] = []  # (optimizer step, training loss)
        self.epoch_seconds = self.epoch_tokens = 0.0
        self.total_seconds = self.total_tokens = 0.0
        self._first_batch = True
        self._started = None
        self._epoch_batches = 0
        self._previous_mean = 0.0
        self._update: list[float] = []

    def on_train_begin(self, logs=None):
        self._first_batch = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_seconds = self.epoch_tokens = 0.0
        self._epoch_batches, self._previous_mean = 0, 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "loss" not in logs:
            return  # a batch skipped on resume (BackupAndRestore): no work done
        # Keras logs the running mean of the epoch's losses; the batch's own
        # loss follows from two consecutive means. Reading it also waits for
        # the step to finish, so the time below is the step's.
        mean = float(logs["loss"])
        elapsed = time.perf_counter() - self._started
        self._epoch_batches += 1
        n = self._epoch_batches
        loss = n * mean - (n - 1) * self._previous_mean
        self._previous_mean = mean
        self.micro_step += 1
        self._update.append(loss)
        if self.micro_step % self.micro_steps == 0:  # an optimizer step: its micro-batches' mean
            self.losses.append((self.micro_step // self.micro_steps,
                                sum(self._update) / len(self._update)))
            self._update = []
        if self._first_batch:
            self._first_batch = False  # tracing and compilation
            return
        self.epoch_seconds += elapsed
        self.epoch_tokens += self.tokens_per_batch
        self.total_seconds += elapsed
        self.total_tokens += self.tokens_per_batch

    @property
    def tokens_per_second(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else 0.0

    def mfu(self, tokens_per_second: float) -> float:
        return tokens_per_second * self.flops_per_token / self.peak_flops

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self.epoch_seconds:
            return
        rate = self.epoch_tokens / self.epoch_seconds
        logs["tokens_per_second"] = rate
        logs["mfu"] = self.mfu(rate)
