"""The rank-0 TensorBoard writer, shared by training and memvp-eval."""

from __future__ import annotations

import os
from typing import Dict, Optional


class ScalarLogger:
    """TensorBoard on rank 0 (a no-op elsewhere); the run directory persists across resumes."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def log(self, scalars: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
