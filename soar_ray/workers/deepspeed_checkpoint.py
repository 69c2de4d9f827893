"""DeepSpeed's checkpoint engine with weights-only loading.

DeepSpeed 0.19's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`, which runs
whatever a pickled file asks for. Every engine file a resume reads (model states and ZeRO
optimizer states, ZeRO 0-3) goes through the engine's `checkpoint_engine.load`, so the learner
swaps in this subclass: the same files, loaded with `weights_only=True` and an allowlist of the
few plain DeepSpeed records the ZeRO optimizer files hold. Its universal-checkpoint loaders still
call `torch.load(weights_only=False)`; soar_ray never enables them.
"""

from __future__ import annotations

from typing import Any

from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from soar_ray.workers.engine import load_weights_only

DEEPSPEED_RECORDS = (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)
"""Classes pickled into ZeRO optimizer-state files: an enum, the loss scalers' settings and a
(numel, start) dataclass; rebuilding them runs no code of the file's choosing."""


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """`TorchCheckpointEngine` whose `load` refuses anything but tensors, plain data and
    `DEEPSPEED_RECORDS`, naming the file."""

    @classmethod
    def replacing(cls, engine: TorchCheckpointEngine) -> WeightsOnlyCheckpointEngine:
        """This engine in place of the one `deepspeed.initialize` made (same file format)."""
        if type(engine) is not TorchCheckpointEngine:
            raise TypeError(f"expected DeepSpeed's TorchCheckpointEngine, got {type(engine)}")
        safe = cls()
        safe.zipfile_serialization = engine.zipfile_serialization
        return safe

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_weights_only(path, map_location, allowed=DEEPSPEED_RECORDS)
