import os

# The Triton kernels run under the interpreter on the CPU; triton reads this at decoration time,
# so it is set before any test module here imports the kernels.
os.environ["TRITON_INTERPRET"] = "1"
