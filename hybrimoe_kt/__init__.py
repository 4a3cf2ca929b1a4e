"""hybrimoe-kt: HybriMoE hybrid CPU-GPU Mixture-of-Experts inference as a kTransformers plugin.

Importing the package does no work: every layer (``core``, ``traces``, ``sim``, ...) is imported on
demand, so the torch-free decision core can be used on its own.
"""

__version__ = "0.1.0"
