import os

# The Triton kernels run under the interpreter on the CPU; triton reads this at decoration time,
# so it is set before any test module here imports the kernels. scripts/gpu_check.sh sets
# TRITON_INTERPRET=0 for the cuda-marked tests: the compiled kernels on the GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
