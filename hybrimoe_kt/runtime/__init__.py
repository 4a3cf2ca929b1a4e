"""The hybrid MoE runtime: executes the core's Plans with real tensors.

Host expert store (each expert once in host memory), a fixed pool of GPU expert slots, one copy
stream shared by demand loads and prefetches, and the HybridMoE layer that runs CPU experts (kt-kernel
or torch), GPU experts (slot-indexed kernels) and shared experts concurrently. Without a GPU the GPU
tier runs on device ``cpu`` as a stand-in, so every path runs in CI; results say so.
"""
