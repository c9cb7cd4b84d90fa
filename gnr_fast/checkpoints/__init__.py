"""Single-file Stable Diffusion 1.x/2.x checkpoints (.safetensors / .ckpt), loaded offline with shipped configs.

- :mod:`.reading`: the file's tensors (weights-only unpickling for .ckpt), corrupt/non-checkpoint errors;
- :mod:`.families`: SD 1.x vs SD 2.x from the keys, the prediction-type rules;
- :mod:`.layout`: the original (LDM) key of every diffusers parameter, for the missing-key check;
- :mod:`.single_file`: loading through diffusers' ``from_single_file(config=DIR)``;
- :mod:`.converting`: ``gnr-fast convert`` (file → diffusers folder).
"""

from .converting import convert_single_file
from .families import PREDICTION_TYPES, check_prediction_type
from .reading import SINGLE_FILE_SUFFIXES, is_single_file, read_state_dict
from .single_file import SingleFileModules, load_single_file

__all__ = [
    "PREDICTION_TYPES",
    "SINGLE_FILE_SUFFIXES",
    "SingleFileModules",
    "check_prediction_type",
    "convert_single_file",
    "is_single_file",
    "load_single_file",
    "read_state_dict",
]
