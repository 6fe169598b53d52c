"""Header names of the dsnode HTTP API (PRODUCT.md)."""

NODE = "X-DSNode-Node"  # the node that generated the answer
ROUTE = "X-DSNode-Route"  # "local" or "forwarded"
REQUEST_ID = "X-Request-Id"  # given by the client or made up; passed on when forwarding
