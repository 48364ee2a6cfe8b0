from .dida_resnet import DidaResNet
