"""Header names of the dsnode HTTP API (PRODUCT.md), defined here and nowhere else."""

# On every completion answer
NODE = "X-DSNode-Node"  # the node that generated the answer
ROUTE = "X-DSNode-Route"  # "local" or "forwarded"
VERSION = "X-DSNode-Version"  # the model version that generated the answer (docs/versions.md)
REQUEST_ID = "X-Request-Id"  # given by the client or made up; passed on when forwarding

# From clients
SPLIT_KEY = "X-DSNode-Split-Key"  # who the request is for, to keep it on one version of a split

# Between nodes (dsnode.cluster.peer_auth signs them)
VIA = "X-DSNode-Via"  # the nodes a forwarded request passed through, comma-separated
USER = "X-DSNode-User"  # the client's identity (API key name or fingerprint), signed
PEER = "X-DSNode-Peer"  # the peer credential
PEER_CHALLENGE = "X-DSNode-Peer-Challenge"  # on a 401 to a peer: "<boot id> <node name>" to sign for
