"""What the compiled (numba) CPU kernels of diversity and score/kernel_cpu.py share."""

try:
    import numba
except ImportError:  # numba is a dependency, but every kernel has a complete torch path without it
    numba = None


def use_torch_threads() -> None:
    """Run numba's parallel loops on torch's thread budget (Ray actors and OMP_NUM_THREADS set it).
    Call before each parallel numba call: the setting is per calling thread."""
    import torch

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
