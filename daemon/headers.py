"""Header names of the dsnode HTTP API (PRODUCT.md), defined here and nowhere else."""

# On every completion answer
NODE = "X-DSNode-Node"  # the node that generated the answer
ROUTE = "X-DSNode-Route"  # "local" or "forwarded"
REQUEST_ID = "X-Request-Id"  # given by the client or made up; passed on when forwarding

# Between nodes (dsnode.cluster.peer_auth signs them)
VIA = "X-DSNode-Via"  # the nodes a forwarded request passed through, comma-separated
USER = "X-DSNode-User"  # the client's identity (API key name or fingerprint), signed
PEER = "X-DSNode-Peer"  # the peer credential
PEER_CHALLENGE = "X-DSNode-Peer-Challenge"  # on a 401 to a peer: "<boot id> <node name>" to sign for
