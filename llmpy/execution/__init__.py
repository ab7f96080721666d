"""Execution models: where and when the kernel calls run, never what they compute.

- `sequential` (base.py): one thread everywhere (serial numba kernels, 1 BLAS thread): the reference order.
- `forkjoin` (base.py): each kernel a parallel loop with a barrier after it (numba `prange` over rows or channel
  blocks on the chosen threading layer, `omp` or `tbb`; OpenBLAS with the same thread count).
- `tasks` (tasks/): the step as a dataflow graph of the model's calls cut into token / channel / parameter
  blocks by the kernels' split rules, run by N worker threads (llmpy's own scheduler or Dask's).
- `mpi` (mpi/): this process is one data-parallel rank under mpiexec, running one of the others inside;
  gradients and updates combined by a strategy.

All of them run the model's one list of kernel calls (llmpy.core.model). Options are validated once, in
options.py; make_execution_model (factory.py) builds a model by name. Creating an execution model fixes the
thread settings for the process (numba's threading layer can be chosen once per process); `close()` restores BLAS.
"""
