from .dida_digitnet import DigitNet
from .dida_resnet import DidaResNet
