"""The runtime layer every entry point stands on (``adamerge``, ``adamerge-finetune``, ``adamerge-merge-models``).

``config``: where the config tree is and how to compose it without Hydra's runtime (the Python API);
``process``: the set-up a run does first (warnings, threads, device, host memory, seed, writable folders);
``reporting``: config printing, loggers and W&B finishing; ``host_memory`` and ``distributed``: the CPU
allocator policy and multi-process failure handling. Nothing here knows a merge method.
"""
