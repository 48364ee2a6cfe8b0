"""dida-timm: DIDA-Net (Dynamic Instance Domain Adaptation, arXiv:2203.05028) models for timm.

Importing the package registers its models with timm, so `timm.create_model('dida_resnet18')` works.
"""
from .layers import DidaBranch, DidaModule, DidaStage
from .models import DidaResNet, DigitNet, add_dida, register_dida

__version__ = '0.1.0'
