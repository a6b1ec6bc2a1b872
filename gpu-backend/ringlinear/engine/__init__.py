"""Continuous-batching engine: state slots, paged KV, prefix-state cache, seeded sampling (imports: engine -> model -> ops)."""

from .async_engine import AsyncEngine, EngineDead
from .engine import (Engine, EngineConfig, EngineConfigError, MemoryPlan, QueueFull, Request, RequestOutput,
                     RequestRejected)
from .sampling import SamplingError, SamplingParams
from .weights import random_model

__all__ = ["AsyncEngine", "EngineDead", "Engine", "EngineConfig", "EngineConfigError", "MemoryPlan", "QueueFull",
           "Request", "RequestOutput", "RequestRejected", "SamplingError", "SamplingParams", "random_model"]
