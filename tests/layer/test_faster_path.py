"""FasterPath: per-key choice between two paths from their first timings."""
import pytest

from torchaq.layer.faster_path import FasterPath


def test_paths_take_turns_until_each_is_timed():
    paths = FasterPath(("scan", "dense"), min_samples=2, max_samples=3)
    order = []
    for seconds in (1.0, 0.9, 1.1, 1.0):  # within the clear ratio: no early decision
        path = paths.next_path("k")
        order.append(path)
        paths.record("k", path, seconds)
    assert order == ["scan", "dense", "scan", "dense"]
    assert paths.choice("k") is None


def test_a_clear_winner_is_chosen_after_the_minimum_samples():
    paths = FasterPath(("scan", "dense"), min_samples=1, clear_ratio=1.5)
    paths.record("k", "scan", 3.0)
    assert paths.choice("k") is None  # dense not timed yet
    paths.record("k", "dense", 1.0)
    assert paths.choice("k") == "dense" and paths.next_path("k") == "dense"
    paths.record("k", "scan", 0.01)  # a decided key ignores later timings
    assert paths.choice("k") == "dense"
    assert paths.choice("other") is None and paths.next_path("other") == "scan"  # keys are independent


def test_a_close_call_takes_the_best_time_after_the_maximum_samples():
    paths = FasterPath(("scan", "dense"), min_samples=1, max_samples=3, clear_ratio=1.5)
    for scan, dense in ((1.0, 1.2), (1.3, 0.95), (1.1, 1.0)):
        assert paths.choice("k") is None
        paths.record("k", paths.next_path("k"), scan)
        paths.record("k", paths.next_path("k"), dense)
    assert paths.choice("k") == "dense"  # best 0.95 against 1.0
    paths.reset()
    assert paths.choice("k") is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="paths"):
        FasterPath(("scan",))
    with pytest.raises(ValueError, match="paths"):
        FasterPath(("scan", "scan"))
    with pytest.raises(ValueError, match="min_samples"):
        FasterPath(("a", "b"), min_samples=0)
    with pytest.raises(ValueError, match="min_samples"):
        FasterPath(("a", "b"), min_samples=4, max_samples=3)
    with pytest.raises(ValueError, match="clear_ratio"):
        FasterPath(("a", "b"), clear_ratio=0.5)
    with pytest.raises(ValueError, match="path must be one of"):
        FasterPath(("a", "b")).record("k", "c", 1.0)
