"""One module per transport backend: shm, tcp, cuda_ipc, nccl."""
