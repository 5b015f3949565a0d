"""Scale-out on Ray Serve: one engine per replica behind Ray's queue-aware router (``deploy.ray.app``), clean JSON
errors from Ray's own HTTP proxy (``deploy.ray.proxy``), and the autoscaling target derived from a measured batch
capacity (``deploy.ray.capacity``). Importable as ``deploy.ray`` with the repository root on ``PYTHONPATH``; this
folder itself must never be on ``sys.path`` (it would shadow the ``ray`` package)."""
