"""Where the adapted checkpoints we publish live: hub/checkpoints/<name>/, installed as `dida_timm.checkpoints`."""
from importlib import resources
from pathlib import Path
from typing import Optional

__all__ = ['published_folder']


def published_folder(name: str) -> Optional[Path]:
    """The repo folder of published checkpoint `name`, or None when this install does not have it."""
    candidates = []
    try:
        candidates.append(Path(str(resources.files('dida_timm.checkpoints').joinpath(name))))
    except ModuleNotFoundError:
        pass
    candidates.append(Path(__file__).resolve().parents[2] / 'hub' / 'checkpoints' / name)  # a source checkout
    return next((c for c in candidates if (c / 'model.safetensors').is_file()), None)
