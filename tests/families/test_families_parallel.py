"""GPT-2, Phi-3, OLMo 2, Gemma, Gemma 2, Gemma 3 and Phi-2 at TP=2, PP=2 and TP x PP on 4 gloo ranks:
logits and bitwise export (Phi-2's output-layer bias included).

One launch runs every layout and family; each layout is checked by the assertions of
``tests/conversion/test_exporting.py`` (logits vs transformers, every export mode and order, the
saved checkpoint bitwise equal to the source and loadable by transformers).
"""

from __future__ import annotations

import pytest
import torch
from conversion import test_exporting
from conversion.conversion_checks import LAYOUTS, round_trip_all_layouts
from factories import make_checkpoint
from processes import launch

FAMILIES = ["gpt2", "phi3", "olmo2", "gemma", "gemma2", "gemma3", "phi2"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("families-parallel")
    checkpoints = {family: str(make_checkpoint(family, root / family)) for family in FAMILIES}
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    results = launch(round_trip_all_layouts, test_exporting.WORLD, checkpoints, input_ids,
                     str(root / "saved"))
    return checkpoints, input_ids, results


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_layout(launched, family, tp, pp):
    test_exporting.test_layout(launched, family, tp, pp)
