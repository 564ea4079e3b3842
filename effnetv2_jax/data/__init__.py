"""Input pipeline: dataset registry, preprocessing, RandAugment/AutoAugment, tf.data iterators.

TensorFlow lives only under this package (see DESIGN.md); models and train steps never import it.
Submodules are imported explicitly (`from effnetv2_jax.data import input_pipeline`) so that importing
`effnetv2_jax.data.datasets` alone stays free of TF.
"""
