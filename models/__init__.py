from ptqkit.models.checkpoint import load_checkpoint, read_state_dict
from ptqkit.models.zoo import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "load_checkpoint", "read_state_dict", "register_model"]
