"""What a rank can say about the transport its MPI uses: the library, its device or network module, and the
environment variables that choose the network (MPICH: MPIR_CVAR_CH4_NETMOD ucx|ofi, then UCX_TLS /
UCX_NET_DEVICES or FI_PROVIDER; Open MPI: OMPI_MCA_pml / OMPI_MCA_btl; Intel MPI: I_MPI_FABRICS).

MPI has no standard call that names the transport it picked at run time, so this reports what the library
says of itself (MPI_Get_library_version) and the choice the environment made, including where none was made:
UCX with UCX_TLS unset picks its transports itself, and uses shared memory between processes it finds on one
kernel (even in separate network namespaces)."""

from __future__ import annotations

import os
import re

# UCX_RNDV_*: over TCP, UCX's rendezvous protocol completes collectives posted together at about the same time,
# its eager one (UCX_RNDV_THRESH=inf) in the order they were posted (bench/completion_order.py), which moves how a
# strategy's waits split between its collectives
NETWORK_VARIABLES = ("MPIR_CVAR_CH4_NETMOD", "UCX_TLS", "UCX_NET_DEVICES", "UCX_RNDV_THRESH", "UCX_RNDV_SCHEME",
                     "FI_PROVIDER", "MPIR_CVAR_CH4_SHM", "MPIR_CVAR_NOLOCAL", "OMPI_MCA_pml", "OMPI_MCA_btl",
                     "OMPI_MCA_btl_tcp_if_include", "I_MPI_FABRICS", "I_MPI_OFI_PROVIDER")


# Where UCX_RNDV_THRESH is unset, llmpy sets it: UCX over TCP (the mpich wheel's) otherwise sends messages below
# ~4 MiB eagerly, copied in fragments that each MPI test pushes a few of, so collectives waited for as llmpy waits
# (tests 0.1 ms apart) moved ~2 Gbit/s on any link; rendezvous hands the whole buffer to the kernel (8-11 Gbit/s
# between two namespace hosts). bench/README.md: "UCX's rendezvous threshold".
RENDEZVOUS_THRESHOLD = "64k"
DEFAULTS = {"UCX_RNDV_THRESH": RENDEZVOUS_THRESHOLD}


def apply_network_defaults(environ=os.environ) -> dict:
    """Set DEFAULTS where `environ` has none (before MPI_Init: UCX reads them then); returns those set."""
    applied = {name: value for name, value in DEFAULTS.items() if name not in environ}
    environ.update(applied)
    return applied


def describe_transport(library_version: str, environ=os.environ, defaults=()) -> str:
    """One line: library and version, the network module in effect, and the variables that chose it (those in
    `defaults` marked as llmpy's)."""
    first = library_version.strip().splitlines()[0].strip() if library_version.strip() else "unknown MPI"
    chosen = [f"{name}={environ[name]}" + (" (llmpy's default)" if name in defaults else "")
              for name in NETWORK_VARIABLES if name in environ]
    device = re.search(r"MPICH Device:\s*(\S+)(.*)", library_version)
    if device:
        version = re.search(r"MPICH Version:\s*(\S+)", library_version)
        kind, netmods = device.group(1).split(":", 1) if ":" in device.group(1) else (device.group(1), "")
        available = [netmods] + device.group(2).split() if netmods else device.group(2).split()
        netmod = environ.get("MPIR_CVAR_CH4_NETMOD") or (available[0] if available else "?")
        line = f"MPICH {version.group(1) if version else '?'} {kind}:{netmod}"
        if netmod == "ucx" and "UCX_TLS" not in environ:
            chosen.append("UCX_TLS unset: UCX picks, shared memory between ranks on one kernel")
        elif netmod == "ofi" and "FI_PROVIDER" not in environ:
            chosen.append("FI_PROVIDER unset: libfabric picks")
    else:
        line = first
    return line + (f" ({', '.join(chosen)})" if chosen else "")
