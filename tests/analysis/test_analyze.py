"""The analysis driver (hf_eot.analysis.analyze): it analyses what the model runs (softmax at its
temperature), refuses what the Fenchel dual does not describe, and reports the split sensitivity and
eq. (13) beside alpha z."""

import math

import pytest
import torch

import hf_eot
from hf_eot.analysis import analyze
from hf_eot.analysis.mapping import SPLITS


def test_softmax_temperature_is_analysed_as_the_model_runs_it(tiny):
    """A BERT configured with softmax epsilon = 2 is analysed with alpha = 1 / 2: eq. (16) at lambda = alpha z
    reproduces the weights the model computes (mapping error at round-off), and the deviation differs
    from the epsilon = 1 model's."""
    batch = tiny.text_batch()
    plain = analyze(tiny.bert(), batch)
    model = tiny.bert("eot")
    hf_eot.configure(model, "softmax", epsilon=2.0)
    r = analyze(model, batch)
    assert r.meta["epsilon"] == {"encoder": [2.0, 2.0]}
    assert r.meta["attn_implementation"] == "eot"
    assert float(r.encoder.head_metrics["mapping_error"].max()) < 1e-12
    dev, dev1 = r.relative_deviation, plain.relative_deviation
    assert not torch.allclose(dev[torch.isfinite(dev)], dev1[torch.isfinite(dev1)])


def test_configured_model_running_another_implementation_is_refused(tiny):
    """A config asking for softmax epsilon = 2 on a model kept on "eager" (which ignores it) is refused,
    naming the fix, instead of silently analysing the epsilon = 1 attention."""
    model = tiny.bert("eot")
    hf_eot.configure(model, "softmax", epsilon=2.0)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation='eot'"):
        analyze(model, tiny.text_batch(), attn_implementation=None)


def test_named_prior_is_refused(tiny):
    """Softmax with a named position prior (ALiBi) is refused: the prior is not part of the mapping."""
    model = tiny.bert("eot")
    hf_eot.configure(model, "softmax", prior="alibi")
    with pytest.raises(ValueError, match="prior='alibi'"):
        analyze(model, tiny.text_batch())


def test_model_with_nan_weights_gives_a_clear_error(tiny):
    """Non-finite weights are reported as such (not as an ill-conditioned eigendecomposition)."""
    model = tiny.bert()
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        analyze(model, tiny.text_batch())


@pytest.mark.parametrize("factory", ["bert", "t5"])
def test_split_sensitivity_and_second_order_are_reported(tiny, factory):
    """Every architecture reports the paper's split (t_i = x_i / sqrt(d')) and the deviation under the
    other splits; the layer table carries their means and eq. (13)'s deviation, all finite at real queries."""
    model = getattr(tiny, factory)()
    batch = tiny.t5_batch() if factory == "t5" else tiny.text_batch()
    r = analyze(model, batch)
    assert r.meta["splits"] == dict(SPLITS)
    for comp in r.components.values():
        real = comp.query_mask[None, None].expand_as(comp.relative_deviation)
        for key in (
            "relative_deviation_unscaled_templates",
            "relative_deviation_unscaled_evidence",
            "second_order_deviation",
        ):
            assert torch.isfinite(comp.metrics[key][real]).all(), key
        row = comp.layer_table()[0]
        assert {"second_order_mean", "unscaled_templates_mean", "unscaled_evidence_mean"} <= set(row)
        # t_i = x_i differs from the paper's split (the dual changes with the split, the attention not)
        assert not torch.allclose(
            comp.metrics["relative_deviation_unscaled_templates"][real], comp.relative_deviation[real]
        )
