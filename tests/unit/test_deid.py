import math

from pipeline_steps.core.deid import age_in_years, pseudonym


def test_pseudonym_is_stable_keyed_and_typed():
    a = pseudonym("MRN-1", "k1", "patient")
    assert a == pseudonym("MRN-1", "k1", "patient")
    assert a != pseudonym("MRN-1", "k2", "patient")
    assert a != pseudonym("MRN-1", "k1", "study")
    assert "MRN" not in a and a.startswith("pat-")


def test_age_from_age_string_or_dates():
    assert age_in_years("054Y", None, None) == 54
    assert age_in_years("018M", None, None) == 1
    assert age_in_years(None, "19600615", "20260614") == 65
    assert age_in_years(None, "19600615", "20260615") == 66
    assert math.isnan(age_in_years("garbage", None, None))
