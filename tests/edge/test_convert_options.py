"""ConvertOptions: what `dsnode convert` can be asked for, checked before anything is read."""

from __future__ import annotations

import pytest
from dsnode.edge.convert_options import ConvertError, ConvertOptions


@pytest.mark.parametrize(("quant", "zero_points", "symmetric"), [
    ("int8", "auto", True), ("int4", "auto", False),  # auto: zero points where they lower the logit error
    ("int8", "yes", False), ("int4", "no", True),
])
def test_zero_points_resolve_per_quantization(quant, zero_points, symmetric):
    options = ConvertOptions(quant=quant, zero_points=zero_points)
    options.check()
    assert options.symmetric is symmetric
    assert options.weights({})["symmetric"] is symmetric


def test_an_unknown_zero_points_choice_is_refused_naming_the_choices():
    with pytest.raises(ConvertError, match=r"--zero-points 'maybe': choose one of auto, yes, no"):
        ConvertOptions(zero_points="maybe").check()
