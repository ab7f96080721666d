"""Execution models: where and when the kernel calls run, never what they compute.

- `sequential`: one thread everywhere (serial numba kernels, 1 BLAS thread): the reference order.
- `forkjoin`: each kernel a parallel loop with a barrier after it (numba `prange` over rows or channel
  blocks on the chosen threading layer, `omp` or `tbb`; OpenBLAS with the same thread count).
- `tasks`: the step as a dataflow graph of kernel calls on token / channel / parameter blocks, run by N
  worker threads (llmpy's own scheduler or Dask's), serial nogil kernels and 1-thread BLAS (see .tasks).
- `mpi`: this process is one data-parallel rank under mpiexec, running `sequential` or `forkjoin` inside;
  gradients and updates combined by a strategy (see .distributed).

Both run the model's one list of kernel calls. Creating an execution model fixes the thread settings
for the process (numba's threading layer can be chosen once per process); `close()` restores BLAS.
"""
