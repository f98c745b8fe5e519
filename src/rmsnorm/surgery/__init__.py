"""Model surgery: LayerNorm -> RMSNorm (approximate or exact) and acceleration of existing RMSNorm modules."""

from .accelerate import accelerate, family_of
from .convert import convert
from .exact import ExactConversionError, convert_exact
from .report import SurgeryReport
from .transaction import SurgeryError

__all__ = ["ExactConversionError", "SurgeryError", "SurgeryReport", "accelerate", "convert", "convert_exact",
           "family_of"]
