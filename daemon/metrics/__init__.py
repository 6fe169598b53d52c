"""`GET /metrics`: Prometheus figures of one node, named as vLLM/TGI users already chart them.

Three sources, one registry per application:
- every finished request's `RequestRecord` (an observer in `node.observers`): request counts,
  TTFT / inter-token / end-to-end / queue-time histograms, token counters, forwarding per upstream
  (`dsnode.metrics.requests`);
- figures read when Prometheus scrapes (`dsnode.metrics.collectors`): the engine's `load_figures()`,
  the balancer's `node.upstream_states()`, NVML GPU readings (`dsnode.gpu`, sampled in a thread), and
  the latest `dsnode bench nccl --publish` result file (its path passed in);
- config reloads, counted by `NodeServer.reload`.

Every metric is described in docs/observability.md.
"""

from .node import METRICS, UNKNOWN_MODEL, NodeMetrics, install_metrics
from .requests import FOLD_EVERY

__all__ = ["FOLD_EVERY", "METRICS", "UNKNOWN_MODEL", "NodeMetrics", "install_metrics"]
