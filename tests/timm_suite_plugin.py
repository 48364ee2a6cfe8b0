"""pytest plugin that lets timm's own `tests/test_models.py` see the dida_timm models.

Loaded with `-p timm_suite_plugin` before collection: importing dida_timm registers the models, and the
DIDA-ResNets are listed under timm's `resnet` module name too, because the suite picks the models for its
`forward_intermediates` tests by module name.
"""
import timm.models._registry as timm_registry

import dida_timm  # noqa: F401  registers the models

timm_registry._module_to_models['resnet'].update(timm_registry._module_to_models['dida_resnet'])
