"""Session fixtures of the end-to-end tests that share real processes across modules."""

from __future__ import annotations

import pytest

from tests.e2e.clients_support import CENTRAL_MODEL, EDGE_MODEL, Route, start_pair
from tests.support.models import cache_dir


@pytest.fixture(scope="session")
def client_nodes(tmp_path_factory, bundled):
    """A central (transformers, MoE) and an edge (int8 ONNX, dense) forwarding to it, for the client tests."""
    from dsnode.demo import prepare_models

    models = prepare_models(cache_dir())  # the int8 ONNX edge model, converted once into the bundled cache
    central, edge = start_pair(tmp_path_factory.mktemp("clients"), models.moe, models.dense_onnx_int8)
    yield {"central": central, "edge": edge}
    codes = edge.stop(), central.stop()
    assert codes == (0, 0), edge.log_tail() + central.log_tail()


@pytest.fixture(scope="session")
def routes(client_nodes) -> dict[str, Route]:
    central, edge = client_nodes["central"], client_nodes["edge"]
    return {
        "central": Route("central", central.url, CENTRAL_MODEL, central.name),
        "edge": Route("edge", edge.url, EDGE_MODEL, edge.name),
        "edge→central": Route("edge→central", edge.url, CENTRAL_MODEL, central.name),
    }
