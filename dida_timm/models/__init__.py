from .dida_digitnet import DigitNet
from .dida_resnet import DidaResNet
from ._static_twin import static_twin_filter_fn
from .dida_generic import add_dida
from .dida_any import register_dida
