"""The timm models this package registers, for tests that must cover every one of them."""
from typing import List

import timm

import dida_timm  # noqa: F401  registers the models

OUR_MODULES = ('dida_resnet', 'dida_digitnet', 'dida_generic')


def our_models(pretrained: bool = False, include_tags: bool = False) -> List[str]:
    return timm.list_models(module=list(OUR_MODULES), pretrained=pretrained, include_tags=include_tags or pretrained)


# timm's own suite runs on the smallest member of each generic family: the larger members share every code path
# with it, and all of them would multiply CI time (tests/test_add_dida.py checks each registered model's API,
# weights loading and gradients)
SUITE_SKIPPED = (
    'dida_convnext_femto', 'dida_convnext_pico', 'dida_convnext_nano', 'dida_convnext_tiny', 'dida_convnext_small',
    'dida_efficientnet_b1', 'dida_efficientnet_b2', 'dida_efficientnet_b3', 'dida_regnety_008', 'dida_regnety_016',
    'dida_regnety_032', 'dida_resnet50d',
)


def suite_models(pretrained: bool = False, include_tags: bool = False) -> List[str]:
    """our_models() less SUITE_SKIPPED: the models timm's test suite runs on in CI."""
    return [m for m in our_models(pretrained, include_tags) if m.split('.')[0] not in SUITE_SKIPPED]
