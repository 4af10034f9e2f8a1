"""A callback that kills its own process at a known point, for resume tests through ``lightning-lora fit``.

Put ``tests/scripts`` on PYTHONPATH and add it to a config's ``trainer.callbacks``::

    - class_path: kill_after.KillAfterStep
      init_args: {step: 3, signal: SIGKILL}

The kill happens at the start of the first batch after optimizer step ``step`` finished, so every callback
of that step (ModelCheckpoint's save of ``last.ckpt`` included) has run: the point is exact, whatever the
machine's speed. SIGKILL ends the process at once (nothing runs after it); SIGINT is Ctrl-C (Lightning's
graceful shutdown runs, then the process exits).
"""

from __future__ import annotations

import os
import signal as signals

from lightning.pytorch.callbacks import Callback


class KillAfterStep(Callback):
    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step = step
        self.signal = getattr(signals, signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            if self.signal == signals.SIGINT and signals.getsignal(signals.SIGINT) is signals.SIG_IGN:
                # Started in the background by a shell without job control, the process inherited SIGINT ignored
                # (Python then installs no KeyboardInterrupt handler): Ctrl-C reaches a foreground process's handler.
                signals.signal(signals.SIGINT, signals.default_int_handler)
            os.kill(os.getpid(), self.signal)
