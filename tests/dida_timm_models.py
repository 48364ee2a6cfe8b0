"""The timm models this package registers, for tests that must cover every one of them."""
from typing import List

import timm

import dida_timm  # noqa: F401  registers the models

OUR_MODULES = ('dida_resnet', 'dida_digitnet', 'dida_generic')


def our_models(pretrained: bool = False, include_tags: bool = False) -> List[str]:
    return timm.list_models(module=list(OUR_MODULES), pretrained=pretrained, include_tags=include_tags or pretrained)

