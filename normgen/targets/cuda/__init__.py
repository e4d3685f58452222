"""The CUDA target: launch shapes derived from the plan, the nvcc build and the pycuda test bench."""
