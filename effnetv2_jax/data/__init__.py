"""Input pipeline: dataset registry, preprocessing, RandAugment/AutoAugment, tf.data iterators.

TensorFlow lives only under this package (the module contracts are in CONTRACTS.md at the repository
root); models and train steps never import it. Submodules are imported explicitly
(`from effnetv2_jax.data import input_pipeline`) so that importing the TF-free ones alone
(`datasets`, `augment`, `randaug_ops`) stays free of TF.
"""
