"""Weight converters into this package's variables {'params', 'batch_stats'}.

Each converter is a name table beside its source format (keras.py: Keras applications); official TF
checkpoints and timm state dicts can be added next to it with their own tables (the names are listed
in the reference notes, section 7). Converters import TensorFlow/Keras/torch lazily, if at all.
"""
from effnetv2_jax.porting.keras import KERAS_V2_LAYERS, from_keras

__all__ = ['from_keras', 'KERAS_V2_LAYERS']
