from .checkpoint import load_last_checkpoint, save_checkpoint
from .evaluation import evaluate, extract_features
from .fixmatch import PseudoLabels, fixmatch_loss, pseudo_label
from .mixstyle import MixStyle, attach_mixstyle
from .loop import MultiViewModel, NonFiniteLossError, train_one_epoch
from .param_groups import uda_param_groups
from .step import UdaConfig, uda_step
