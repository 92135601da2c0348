"""Who this replica is: the `pod` label of its metrics and the holder of its leases."""

from __future__ import annotations

import os
import socket
import uuid


def _in_container() -> bool:
    # In a container (or a Kubernetes pod) the hostname is already unique per replica.
    return (
        os.getpid() == 1
        or os.path.exists("/.dockerenv")
        or "KUBERNETES_SERVICE_HOST" in os.environ
    )


def default_instance_id() -> str:
    """The hostname; on a bare host, where several replicas often share it, hostname-pid."""
    host = socket.gethostname() or "localhost"
    return host if _in_container() else f"{host}-{os.getpid()}"


def holder_token(instance_id: str) -> str:
    """A lease holder value: readable (who holds it) and unique per grant attempt."""
    return f"{instance_id}/{uuid.uuid4().hex[:12]}"
