"""Kernel backends of the fused ops: the torch reference (the specification), C++ (CPU), Triton and CUDA
C++; ``dispatch`` says which exist and which a call uses; ``abi`` fills the compiled kernels' argument
blocks; ``rows`` gives tensors the ``[rows, N]`` layout the kernels read."""
