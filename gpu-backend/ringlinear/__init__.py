"""Ring-linear-2.0 (BailingMoeLinearV2ForCausalLM): reference model, checkpoint tools and GPU serving pod."""

from .config import RingLinearConfig, ConfigError

__all__ = ["RingLinearConfig", "ConfigError"]
