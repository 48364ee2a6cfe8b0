"""pytest plugin that lets timm's own `tests/test_models.py` see the dida_timm models.

Loaded with `-p timm_suite_plugin` before collection: importing dida_timm registers the models, and the
models are listed under timm's `resnet` module name too, because the suite picks the models for its
`forward_intermediates` tests by module name and only knows timm's own modules.
"""
import timm.models._registry as timm_registry

import dida_timm  # noqa: F401  registers the models

from dida_timm_models import OUR_MODULES

for module in OUR_MODULES:
    timm_registry._module_to_models['resnet'].update(timm_registry._module_to_models[module])
