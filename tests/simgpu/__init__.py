"""A CPU stand-in for CuPy and the CUDA execution model, so the GPU code paths and the .cu
kernels are tested in CI without a GPU (``cupy_shim``, ``kernels``, ``cuda_sim.h``)."""
