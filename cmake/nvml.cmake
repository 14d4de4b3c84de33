# NVML: the shim's libnvidia-ml.so.1 and the simulated GPU's (owned by the NVML work).
