"""pigeon_utils — the helper package behind the Pigeon notebooks.

Importing the package first sets two process-wide defaults: Hugging Face libraries run offline
(``HF_HUB_OFFLINE=1``), and a CUDA-built torchvision next to a CPU torch is made importable
(see :mod:`pigeon_utils._compat`).
"""
from pigeon_utils._compat import ensure_torchvision_importable, set_offline_defaults

set_offline_defaults()
ensure_torchvision_importable()

__version__ = "0.1.0"
