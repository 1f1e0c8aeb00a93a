"""Developer tools that ship with the package: the static GPU gate (``rpp_kernels.tools.static_gate``)."""
