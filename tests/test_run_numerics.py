"""bench.run_numerics: where two runs' logged steps first differ, and when the reference clipped."""

from bench.run_numerics import SETTINGS, compare, first_clipped, first_difference


def steps(losses, norms):
    return [{"step": i + 1, "loss": loss, "grad_norm": norm} for i, (loss, norm) in enumerate(zip(losses, norms))]


def test_the_first_step_that_differs_in_any_bit_is_found():
    a = steps([3.0, 2.5, 2.25, 2.0], [0.5, 1.25, 0.75, 0.5])
    b = steps([3.0, 2.5, 2.25 + 2 ** -50, 2.0], [0.5, 1.25 + 2 ** -40, 0.75, 0.5])
    assert first_difference(a, b, "grad_norm") == 2
    assert first_difference(a, b, "loss") == 3
    assert first_difference(a, a, "loss") is None
    assert first_difference(a, b[:2], "loss") is None  # only steps both runs logged are compared
    assert first_clipped(a, 1.0) == 2
    assert first_clipped(a, 2.0) is None
    assert first_clipped(a, 0.0) is None  # clipping off never clips


def test_each_setting_is_compared_with_its_own_reference():
    same = steps([3.0, 2.5, 2.0], [0.5, 1.5, 0.5])
    later = steps([3.0, 2.5, 2.125], [0.5, 1.5 + 2 ** -20, 0.5])
    records = {s.label: same for s in SETTINGS}
    records["2 processes, 1 thread each"] = later
    rows = {r["setting"]: r for r in compare(records, clip_grad=1.0)}
    assert set(rows) == {s.label for s in SETTINGS if s.reference}
    two = rows["2 processes, 1 thread each"]
    assert (two["first_grad_norm_difference"], two["first_loss_difference"]) == (2, 3)
    assert two["reference_first_clipped"] == 2 and two["last_loss_difference"] == 0.125
    unclipped = rows["2 processes, 1 thread each, no clipping"]
    assert unclipped["first_loss_difference"] is None and unclipped["reference_first_clipped"] is None
