"""rmsnorm: exact and fast RMSNorm / partial RMSNorm (Zhang & Sennrich, NeurIPS 2019) for PyTorch."""

from .backends import BackendInfo, backends
from .functional import rms_norm
from .module import GatedRMSNorm, RMSNorm
from .spec import Cast
from .surgery import SurgeryReport, accelerate, convert

__version__ = "0.1.0"

__all__ = ["BackendInfo", "Cast", "GatedRMSNorm", "RMSNorm", "SurgeryReport", "__version__", "accelerate", "backends",
           "convert", "rms_norm"]
