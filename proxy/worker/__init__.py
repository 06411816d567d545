"""What runs inside a worker process (``python -m proxy.worker``); never imported by the proxy side."""
