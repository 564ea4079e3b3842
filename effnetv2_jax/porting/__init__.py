"""Weight converters into this package's variables {'params', 'batch_stats'}.

One name table per source format, all filled by `names.fill_variables` (which reports every
missing, unexpected and mis-shaped array in one ValueError):
  keras.py          from_keras(keras_model, model_name)            Keras applications
  tf_checkpoint.py  from_tf_checkpoint(path, model_name, use_ema)  official google/automl checkpoints
  timm.py           from_timm(state_dict, model_name)              timm tf_efficientnet(v2)_* ports
                    load_state_dict(path)                          .safetensors / .npz, never pickle
  convert.py        python -m effnetv2_jax.porting.convert ...     -> an orbax checkpoint (init_from)
  export.py         export_inference(...)                          StableHLO / SavedModel for serving
Converters import TensorFlow/Keras lazily, if at all; torch is never needed.
"""

from effnetv2_jax.porting.keras import KERAS_V2_LAYERS, from_keras
from effnetv2_jax.porting.tf_checkpoint import TF_BLOCKS, from_tf_checkpoint, to_tf_names
from effnetv2_jax.porting.timm import TIMM_BLOCKS, from_timm, load_state_dict, to_timm

__all__ = [
  "from_keras",
  "KERAS_V2_LAYERS",
  "from_tf_checkpoint",
  "to_tf_names",
  "TF_BLOCKS",
  "from_timm",
  "to_timm",
  "load_state_dict",
  "TIMM_BLOCKS",
]
