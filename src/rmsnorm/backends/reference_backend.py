"""The ``reference`` backend: :mod:`rmsnorm.reference` on any device and floating dtype."""

from .. import reference as _ref
from ..args import FLOAT_DTYPES
from .registry import Backend, register
from .rows import nd_backward, nd_forward

BACKEND = register(Backend(
    name="reference",
    priority=0,
    devices=frozenset({"*"}),
    dtypes=FLOAT_DTYPES,
    forward=nd_forward(_ref.forward),
    backward=nd_backward(_ref.backward),
    check_available=lambda: None,
    description="pure PyTorch forward with a hand-written backward; the oracle (slow: several passes)",
))
