"""What an operator looks at: Prometheus metrics (``metrics``), the /metrics, /healthz and /livez
server every command runs (``metrics_server``) and ``codeloop doctor`` (``doctor``, ``doctor_http``).
Imports ``bot.core`` and ``bot.queue``."""
