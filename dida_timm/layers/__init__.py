from .dida import DidaModule, kernel_basis
from .dida_branch import DidaBranch, DidaStage, is_branch_parameter, muted_if_untrained, static_keys_to_blocks
from .dida_triton import set_triton_dida, use_triton_dida
